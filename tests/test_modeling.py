"""Loading in the dtype and on the devices params ask for, and scoring in bf16 with float32 unit sums."""

import torch

from conftest import tiny_model_dir
from nirvana.modeling import load_model
from nirvana.params import ModelParams
from nirvana.saliency import nirvana_scores

TOKENS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))


def test_dtype_and_device_map_are_honoured(tmp_path) -> None:
    folder = tiny_model_dir(tmp_path, "gqa")
    dense = load_model(folder, on="cpu")
    bf16 = load_model(folder, ModelParams(dtype="bfloat16", device_map="auto"))
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert {p.device.type for p in bf16.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}
    with torch.no_grad():
        full, half = dense(input_ids=TOKENS).logits, bf16(input_ids=TOKENS).logits.float()
    assert (full - half).abs().max() < 0.1 * full.abs().max()


def test_bf16_saliency_sums_in_float32_and_ranks_like_fp32(tmp_path) -> None:
    folder = tiny_model_dir(tmp_path, "gqa")
    fp32 = nirvana_scores(load_model(folder, on="cpu"), TOKENS, 2)
    bf16 = nirvana_scores(load_model(folder, ModelParams(dtype="bfloat16"), on="cpu"), TOKENS, 2)
    assert bf16.score.dtype == fp32.score.dtype == "float64"  # stored from float32 sums
    for module in ("attn", "mlp"):
        a, b = (t[t.module == module].score for t in (fp32, bf16))
        assert a.corr(b, method="spearman") > 0.9
