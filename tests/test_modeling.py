"""Loading in the dtype and on the devices params ask for, and scoring in bf16 with float32 unit sums."""

from functools import partial

import torch
from transformers import AutoTokenizer

from conftest import random_plan, save_tokenizer, tiny_llama, tiny_model_dir
from nirvana.core.params import ModelParams, defaults
from nirvana.method.saliency import nirvana_scores
from nirvana.method.surgery import layer_units, prune_model, save_model
from nirvana.models import GRANULARITY_KEY
from nirvana.models.loading import load_model, skeleton

TOKENS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))


def test_dtype_and_device_map_are_honoured(tmp_path) -> None:
    folder = tiny_model_dir(tmp_path, "gqa")
    dense = load_model(folder, on="cpu")
    bf16 = load_model(folder, defaults(ModelParams, dtype="bfloat16", device_map="auto"))
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert {p.device.type for p in bf16.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    with torch.no_grad():
        full, half = dense(input_ids=TOKENS).logits, bf16(input_ids=TOKENS).logits.float()
    assert (full - half).abs().max() < 0.1 * full.abs().max()


def test_bf16_saliency_sums_in_float32_and_ranks_like_fp32(tmp_path) -> None:
    folder = tiny_model_dir(tmp_path, "gqa")
    fp32 = nirvana_scores(load_model(folder, on="cpu"), TOKENS, 2)
    bf16 = nirvana_scores(load_model(folder, defaults(ModelParams, dtype="bfloat16"), on="cpu"), TOKENS, 2)
    assert bf16.score.dtype == fp32.score.dtype == "float64"  # stored from float32 sums
    for module in ("attn", "mlp"):
        a, b = (t[t.module == module].score for t in (fp32, bf16))
        assert a.corr(b, method="spearman") > 0.9


def test_a_pruned_folder_keeps_its_granularity_and_a_dense_one_takes_the_param(tmp_path) -> None:
    """attention.granularity sets the unit of a dense model; a pruned folder's recorded one (its widths count
    those units) is what it keeps, whatever the param says."""
    model = tiny_llama("gqa", seed=1)
    setattr(model.config, GRANULARITY_KEY, "query_head")
    prune_model(model, random_plan(model, seed=5, drop=0.5))
    save_tokenizer(tmp_path / "tokenizer")
    save_model(model, AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), tmp_path / "pruned")
    dense = tiny_model_dir(tmp_path / "dense")
    for load in (partial(load_model, on="cpu"), skeleton):
        assert getattr(load(tmp_path / "pruned", granularity="group").config, GRANULARITY_KEY) == "query_head"
        assert getattr(load(dense, granularity="query_head").config, GRANULARITY_KEY) == "query_head"
    loaded = load_model(tmp_path / "pruned", on="cpu", granularity="group")
    assert layer_units(loaded) == layer_units(model)
