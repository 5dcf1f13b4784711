"""Export a model folder this pipeline wrote (dense, pruned or fine-tuned) to GGUF for llama.cpp and Ollama: the
checks, tensor names and widths, rope layout, writing (k-quants by llama.cpp's quantizer) and the file's record."""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from nirvana.core.errors import InputError
from nirvana.core.io import atomic_path, folder_digest, sha256_file
from nirvana.deploy.gguf_errors import ExportError, UnsupportedModel
from nirvana.deploy.gguf_header import fallbacks
from nirvana.deploy.gguf_types import DIRECT, K_QUANTS, TYPES
from nirvana.deploy.gguf_vocab import Vocab, read_vocab
from nirvana.models.llama import head_dim
from nirvana.models.loading import stored_shapes
from nirvana.models.widths import BIAS_KEY

# Pruned layers differ in width, which llama.cpp's `llama` architecture cannot describe; its `deci` architecture
# (NVIDIA's Nemotron/DeciLM) reads the head counts and MLP width per layer, and otherwise computes what Llama
# computes. Every width is read from the tensors themselves.
ARCH = "deci"
SUPPORTED = ("llama", "mistral", "qwen2")
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

# Hugging Face tensor names (per layer after `model.layers.N.`) and their GGUF names.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


@dataclass
class Layer:
    """One decoder layer's widths, read from its weights."""

    heads: int
    kv_heads: int
    ff: int


@dataclass
class Source:
    """A checked model folder: its config, weight files, head width and (once read) per-layer widths."""

    folder: Path
    config: PretrainedConfig
    weights: list[Path]
    head_dim: int
    layers: list[Layer] = field(default_factory=list)


# ---- checks: all run before anything is written ----


def check_type(type: str) -> str:
    """The type, lower-cased, or an error listing the valid ones."""
    if type.lower() not in TYPES:
        raise ExportError(f"unknown GGUF type {type!r}; valid: {', '.join(TYPES)}")
    if type.lower() in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
        raise ExportError(f"{type} needs llama.cpp's quantizer: pip install -e '.[deploy]' (llama-cpp-python)")
    return type.lower()


def check_out_path(out_path: str | Path) -> Path:
    """The resolved output path, which must be a `.gguf` file inside the current directory's `outputs/`."""
    out = Path(out_path).resolve()
    outputs = (Path.cwd() / "outputs").resolve()
    if not out.is_relative_to(outputs) or out == outputs:
        raise ExportError(
            f"output {out_path} is outside the project's outputs/ folder ({outputs}, resolved against the current "
            "directory); run from the project root and write under outputs/"
        )
    if out.suffix != ".gguf":
        raise ExportError(f"output {out_path} must end in .gguf")
    if out.is_dir():
        raise ExportError(f"output {out_path} is a folder")
    return out


def check_folder(model_dir: str | Path) -> Source:
    """Config and weights of a model folder this pipeline wrote, or an error saying what is missing or unsupported."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{model_dir} is not a model folder written by this pipeline: no config.json")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ExportError(f"{model_dir} is not a model folder written by this pipeline: no *.safetensors weights")
    if not (folder / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json; the GGUF needs the model's own tokenizer")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, KeyError) as error:
        raise ExportError(f"{model_dir}/config.json cannot be read: {error}") from error
    check_architecture(config)
    return Source(folder, config, weights, head_dim(config))


def check_architecture(config: PretrainedConfig) -> None:
    """Refuse what llama.cpp's deci graph would compute differently from transformers."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        reasons = {
            "gemma3_text": "Gemma 3 needs q/k norms, sliding-window layers and scaled embeddings, which deci lacks",
            "t5": "T5 is an encoder-decoder; deci is a decoder-only Llama graph",
        }
        reason = reasons.get(str(model_type), "deci (llama.cpp's per-layer-width Llama) computes a Llama layer only")
        raise UnsupportedModel(
            f"architecture {model_type!r} cannot be exported to GGUF: {reason}; supported: {', '.join(SUPPORTED)}"
        )
    if model_type == "mistral" and getattr(config, "sliding_window", None):
        raise UnsupportedModel("mistral with sliding_window set cannot be exported: deci attends to the whole context")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise UnsupportedModel("qwen2 with use_sliding_window cannot be exported: deci attends to the whole context")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {config.hidden_act!r} cannot be exported: deci's MLP is SiLU-gated")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        raise UnsupportedModel(
            f"rope_type {rope['rope_type']!r} cannot be exported; supported: default, linear, llama3"
        )


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """The rope settings (transformers 5 keeps them in `rope_parameters`, older configs in `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


# ---- weights ----


def tensor_names(source: Source) -> list[tuple[str, str, Path]]:
    """(GGUF name, Hugging Face name, file) of every tensor the GGUF holds, in file order; the LM head is left
    out when tied to the embeddings (llama.cpp then reuses token_embd)."""
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    out = []
    for path in source.weights:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                target = gguf_name(name)
                if target is not None or not tied:
                    out.append((target or "output.weight", name, path))
    return out


def gguf_name(name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor; None for the LM head (handled apart)."""
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    if name == "lm_head.weight":
        return None
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"blk.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.{match.group(3)}"
    raise ExportError(f"tensor {name} has no place in a deci GGUF")


def read_layers(source: Source, shapes: dict[str, tuple[int, ...]]) -> list[Layer]:
    """Per-layer query heads, KV heads and MLP channels from the q, k and gate shapes."""
    d, out = source.head_dim, []
    for i in range(source.config.num_hidden_layers):
        q, k = shapes[f"model.layers.{i}.self_attn.q_proj.weight"], shapes[f"model.layers.{i}.self_attn.k_proj.weight"]
        if q[0] % d or k[0] % d or (q[0] // d) % (k[0] // d):
            raise ExportError(f"layer {i}: q rows {q[0]} and k rows {k[0]} are not whole heads of {d} in groups")
        out.append(Layer(q[0] // d, k[0] // d, shapes[f"model.layers.{i}.mlp.gate_proj.weight"][0]))
    return out


def tensor_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor from the safetensors headers (the pipeline's own input check), no data read."""
    try:
        return {name: shape for name, (shape, _) in stored_shapes(source.folder).items()}
    except InputError as error:
        raise ExportError(str(error)) from error


def rope_rows(heads: int, dim: int) -> torch.Tensor:
    """Row order taking each head from rotate-half (pairs i, i + dim/2) to GGML's interleaved pairs (2i, 2i+1)."""
    within = torch.arange(dim).reshape(2, dim // 2).T.flatten()
    return (torch.arange(heads)[:, None] * dim + within).flatten()


def to_rope_layout(name: str, data: torch.Tensor, layers: list[Layer], dim: int) -> torch.Tensor:
    """q and k rows (weights and biases) of one layer, permuted with that layer's head counts."""
    match = re.fullmatch(r"blk\.(\d+)\.attn_([qk])\.(weight|bias)", name)
    if not match:
        return data
    layer = layers[int(match.group(1))]
    heads = layer.heads if match.group(2) == "q" else layer.kv_heads
    return data[rope_rows(heads, dim)]


def rope_factors(config: PretrainedConfig, dim: int) -> np.ndarray | None:
    """llama3 rope: GGML divides each rotation frequency by a factor; the ratio of plain to scaled frequencies,
    taken from transformers' own llama3 initialiser so both compute the same angles."""
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (plain / scaled.double()).float().numpy()


def storage_type(shape: tuple[int, ...], type: str) -> gguf.GGMLQuantizationType:
    """How a tensor is stored: 1-D tensors in f32, rows that q8_0 blocks do not divide in f16, the rest in `type`."""
    if len(shape) == 1 or type == "f32":
        return gguf.GGMLQuantizationType.F32
    qtype = DIRECT[type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return gguf.GGMLQuantizationType.F16 if shape[-1] % block else qtype


def encode(data: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes (as numpy) in storage type `qtype`."""
    array = data.contiguous().numpy().astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def stored_bytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


# ---- writing ----


def write_metadata(writer: gguf.GGUFWriter, source: Source, vocab: Vocab, type: str) -> None:
    """Hyperparameters (per-layer widths as arrays) and the tokenizer."""
    c, layers, dim = source.config, source.layers, source.head_dim
    writer.add_name(source.folder.resolve().name)
    writer.add_block_count(len(layers))
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_feed_forward_length([layer.ff for layer in layers])
    writer.add_head_count([layer.heads for layer in layers])
    writer.add_head_count_kv([layer.kv_heads for layer in layers])
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_rope_dimension_count(dim)
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(len(vocab.tokens))
    rope = rope_parameters(c)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_file_type(FILE_TYPES.get(type, gguf.LlamaFileType.ALL_F32))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    vocab.special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)


def write_gguf(path: Path, source: Source, vocab: Vocab, type: str) -> None:
    """One GGUF file with `type` for the weights (f32 for k-quants, which llama.cpp quantizes afterwards),
    streamed: the header lists every tensor from the shapes, then each is read, converted and written in turn,
    so memory holds one tensor at a time."""
    shapes = tensor_shapes(source)
    factors = rope_factors(source.config, source.head_dim)
    writer = gguf.GGUFWriter(str(path), ARCH)
    try:
        write_metadata(writer, source, vocab, type)
        names = tensor_names(source)
        for target, name, _ in names:
            qtype = storage_type(shapes[name], type)
            writer.add_tensor_info(target, shapes[name], np.dtype(np.float32), stored_bytes(shapes[name], qtype), qtype)
        if factors is not None:
            writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for path, group in itertools.groupby(names, key=lambda n: n[2]):
            with safe_open(str(path), framework="pt") as handle:
                for target, name, _ in group:
                    data = to_rope_layout(target, handle.get_tensor(name).float(), source.layers, source.head_dim)
                    writer.write_tensor_data(encode(data, storage_type(shapes[name], type)))
        if factors is not None:
            writer.write_tensor_data(factors)
    finally:
        writer.close()


def quantize(f32_path: Path, out: Path, type: str) -> None:
    """llama.cpp's own k-quant of an f32 GGUF, through llama-cpp-python (the `deploy` extra)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_QUANTS[type]
    params.nthread = torch.get_num_threads()  # a stage's share of the CPUs (nirvana.core.stage.cpu_share)
    status = llama_cpp.llama_model_quantize(str(f32_path).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise RuntimeError(f"llama.cpp failed to quantize to {type} (status {status})")


def prepare(model_dir: str | Path, out_path: str | Path, type: str) -> tuple[Source, Vocab, Path, str]:
    """Every check, before anything is written: type, output path, folder, architecture, tokenizer, shapes."""
    type = check_type(type)
    out = check_out_path(out_path)
    source = check_folder(model_dir)
    shapes = tensor_shapes(source)
    for name in shapes:
        gguf_name(name)
    source.layers = read_layers(source, shapes)
    vocab = read_vocab(source.folder, shapes["model.embed_tokens.weight"][0])
    return source, vocab, out, type


def export(model_dir: str | Path, out_path: str | Path, type: str = "f16") -> dict[str, Any]:
    """Write `out_path` (a .gguf under ./outputs/) from a model folder, and `out_path.json` beside it with the
    file's SHA-256, type, fallbacks and source folder. Each appears whole or not at all (temporary file, then
    rename: the GGUF first, its record last); bad input raises ExportError before anything is written."""
    source, vocab, out, type = prepare(model_dir, out_path, type)
    record_path = out.with_name(out.name + ".json")
    with atomic_path(record_path) as record_tmp, atomic_path(out) as tmp:
        if type in K_QUANTS:
            with tempfile.TemporaryDirectory(prefix=f".tmp-{out.name}-f32-", dir=out.parent) as folder:
                intermediate = Path(folder) / "f32.gguf"
                write_gguf(intermediate, source, vocab, "f32")
                quantize(intermediate, tmp, type)
            if not tmp.is_file():
                raise RuntimeError(f"llama.cpp reported success but wrote no {type} file")
        else:
            write_gguf(tmp, source, vocab, type)
        fell_back = fallbacks(tmp, type)
        record = {
            "gguf": out.name,
            "sha256": sha256_file(tmp),
            "type": type,
            "architecture": ARCH,
            "fallbacks": len(fell_back),
            "fallback_tensors": fell_back,
            "layers": [vars(layer) for layer in source.layers],
            "output_bias": bool(getattr(source.config, BIAS_KEY, False)),
            "source": {"path": str(source.folder), "digest": folder_digest(source.folder)},
        }
        record_tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record
