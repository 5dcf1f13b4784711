"""What a written GGUF file stores, read from its header alone: each tensor's storage type, and which weights
fell back from the type the export was asked for."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf

from nirvana.deploy.gguf_types import DIRECT, K_QUANTS

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type: bytes
STRING, ARRAY = 8, 9
K_TYPES = {
    gguf.GGMLQuantizationType.Q2_K,
    gguf.GGMLQuantizationType.Q3_K,
    gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q5_K,
    gguf.GGMLQuantizationType.Q6_K,
}


def stored_types(path: Path) -> dict[str, tuple[int, gguf.GGMLQuantizationType]]:
    """Dimensions and storage type of every tensor in a GGUF file, from its header alone (gguf's GGUFReader
    parses every token string into numpy views, half a minute for a 49k-token vocabulary)."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF":
            raise RuntimeError(f"{path} is not a GGUF file")
        pos = 24

        def skip(kind: int, pos: int) -> int:
            if kind == STRING:
                return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
            if kind == ARRAY:
                item, count = struct.unpack_from("<IQ", data, pos)
                pos += 12
                if item in SCALAR_SIZES:
                    return pos + count * SCALAR_SIZES[item]
                for _ in range(count):
                    pos = skip(item, pos)
                return pos
            return pos + SCALAR_SIZES[kind]

        for _ in range(n_kv):
            pos = skip(STRING, pos)
            (kind,) = struct.unpack_from("<I", data, pos)
            pos = skip(kind, pos + 4)
        out = {}
        for _ in range(n_tensors):
            (length,) = struct.unpack_from("<Q", data, pos)
            name = bytes(data[pos + 8 : pos + 8 + length]).decode()
            pos += 8 + length
            (n_dims,) = struct.unpack_from("<I", data, pos)
            pos += 4 + 8 * n_dims
            (kind,) = struct.unpack_from("<I", data, pos)
            pos += 4 + 8
            out[name] = (n_dims, gguf.GGMLQuantizationType(kind))
        return out


def fallbacks(path: Path, type: str) -> list[str]:
    """2-D weights the file stores in another type than asked (for k-quants: in no k-quant type), counted as
    llama.cpp counts them: its k-quant mixes store the output matrix (the token embedding where it is tied) in
    q8_0 on purpose when its rows are not whole 256-value blocks, which is no fallback."""
    types = stored_types(path)
    output = "output.weight" if "output.weight" in types else "token_embd.weight"
    out = []
    for name, (n_dims, stored) in types.items():
        if n_dims < 2:
            continue
        ok = stored in K_TYPES if type in K_QUANTS else stored == DIRECT[type]
        chosen = type in K_QUANTS and name == output and stored == gguf.GGMLQuantizationType.Q8_0
        if not (ok or chosen):
            out.append(f"{name}:{stored.name.lower()}")
    return out
