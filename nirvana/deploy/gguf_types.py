"""The GGUF types an export can be asked for: those written directly (and the GGML storage each means) and the
k-quants left to llama.cpp's quantizer (with its `llama_ftype`)."""

from __future__ import annotations

import gguf

DIRECT = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
K_QUANTS = {  # llama.cpp's `enum llama_ftype` (include/llama.h)
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
TYPES = (*DIRECT, *K_QUANTS)
