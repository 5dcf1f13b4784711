"""A model folder's tokenizer as a GGUF vocabulary: its tokens and their types, the llama.cpp pre-tokenizer that
splits text the same way, its special tokens, and whether it adds BOS and EOS."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from transformers import AutoTokenizer

from nirvana.deploy.gguf_errors import ExportError, UnsupportedModel

# Pre-tokenizer regexes as tokenizer.json spells them, and the llama.cpp pre-tokenizer that splits the same way.
CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|"
LLAMA3_SPLIT = CONTRACTIONS + r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = CONTRACTIONS + r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


@dataclass
class Vocab:
    """What llama.cpp needs to tokenize exactly as the folder's tokenizer does."""

    tokens: list[str]
    types: list[int]
    pre: str
    add_bos: bool
    add_eos: bool
    special: gguf.SpecialVocab


def pre_tokenizer(spec: dict[str, Any] | None) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json pre-tokenizer does, or an error."""
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") if s else None for s in steps]
    byte_level = (steps[-1] if steps else None) or {}
    if byte_level.get("add_prefix_space"):
        raise UnsupportedModel("tokenizer adds a prefix space (ByteLevel add_prefix_space); llama.cpp's BPE does not")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    digits = kinds == ["Digits", "ByteLevel"] and (steps[0] or {}).get("individual_digits")
    if digits and byte_level.get("use_regex", True):
        return "smollm"
    split = (steps[0] if steps else None) or {}
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) and not split.get("invert"):
        pattern = split.get("pattern", {}).get("Regex")
        if pattern in SPLIT_PRE and split.get("behavior") == "Isolated":
            return SPLIT_PRE[pattern]
    raise UnsupportedModel(f"tokenizer pre-tokenizer {json.dumps(spec)[:200]} has no llama.cpp equivalent known here")


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """Tokens, token types, pre-tokenizer and special tokens of a byte-level BPE tokenizer.json."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedModel("only byte-level BPE tokenizers (GPT-2 style tokenizer.json) can be exported")
    if spec.get("normalizer") not in (None, {"type": "NFC"}):
        raise UnsupportedModel(f"tokenizer normalizer {spec['normalizer'].get('type')!r} has no llama.cpp equivalent")
    pre = pre_tokenizer(spec.get("pre_tokenizer"))
    by_id = {int(i): t for t, i in model["vocab"].items()}
    types = dict.fromkeys(by_id, int(gguf.TokenType.NORMAL))
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise ExportError(f"tokenizer has id {max(by_id)}, the embedding only {n_vocab} rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    add_bos, add_eos = special_added(folder)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    special.add_special_token = {}  # set from what the tokenizer really does (special_added)
    return Vocab(tokens, token_types, pre, add_bos, add_eos, special)


def special_added(folder: Path) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS first and EOS last when encoding with special tokens, found by encoding."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos
