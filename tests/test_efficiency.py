"""Size, memory and speed measurements, and the ideal speedup from FLOPs."""

import copy

import pytest
import torch

from conftest import random_plan, tiny_llama
from nirvana.core.params import EfficiencyParams
from nirvana.evaluation.efficiency import compare_speed, efficiency_report, forward_flops, peak_forward_bytes
from nirvana.method.surgery import layer_units, prune_model


def hand_flops(
    units: list[dict[str, int]], seq_len: int, hidden: int = 24, head_dim: int = 4, n_rep: int = 3, vocab: int = 64
) -> int:
    """The FLOPs formula written out for the tiny GQA Llama of conftest."""
    total = 2 * seq_len * hidden * vocab  # LM head
    for layer in units:
        q = layer["attn"] * n_rep * head_dim
        kv = layer["attn"] * head_dim
        total += 2 * seq_len * (2 * hidden * q + 2 * hidden * kv + 3 * hidden * layer["mlp"])
        total += 4 * seq_len * seq_len * q  # QK^T and AV
    return total


def test_forward_flops_match_the_formula_dense_and_pruned() -> None:
    dense = tiny_llama("gqa")
    pruned = copy.deepcopy(dense)
    prune_model(pruned, random_plan(dense, seed=2))
    for model in (dense, pruned):
        assert forward_flops(model, 32) == hand_flops(layer_units(model), 32)
    assert forward_flops(pruned, 32) < forward_flops(dense, 32)


def test_forward_flops_of_the_tiny_dense_llama_counted_by_hand() -> None:
    """24 hidden, 6 query heads and 2 KV heads of 4, 40 MLP channels, 2 layers, 64 tokens, 32 positions.
    Weights a layer: q 24x24 + k, v 24x8 each + o 24x24 + gate, up, down 24x40 each = 4416; x2 layers + head
    24x64 = 10368 -> 2 x 32 x 10368 = 663552. QK^T and AV: 2 x 2 x 32 x 32 x 24 a layer, x2 = 196608."""
    assert forward_flops(tiny_llama("gqa"), 32) == 663_552 + 196_608


def test_peak_forward_memory_covers_weights_and_grows_with_batch() -> None:
    model = tiny_llama("gqa")
    weights = sum(p.numel() * 4 for p in model.parameters())
    small = peak_forward_bytes(model, torch.zeros(1, 32, dtype=torch.long))
    large = peak_forward_bytes(model, torch.zeros(16, 32, dtype=torch.long))
    logits = 16 * 32 * 64 * 4
    assert weights < small < large and large - weights >= logits


def test_report_has_every_measure_and_the_ideal_ratio(tmp_path) -> None:
    dense = tiny_llama("gqa")
    pruned = copy.deepcopy(dense)
    prune_model(pruned, random_plan(dense, seed=3))
    dense.save_pretrained(tmp_path / "dense")
    pruned.save_pretrained(tmp_path / "pruned")
    report = efficiency_report(
        dense,
        pruned,
        tmp_path / "dense",
        tmp_path / "pruned",
        EfficiencyParams(batch_sizes=[1, 2], prompt_len=16, new_tokens=4, warmup=0, repeats=1),
    )
    flops = {name: hand_flops(layer_units(model), 16) for name, model in (("dense", dense), ("pruned", pruned))}
    assert report["speedup_ideal"] == pytest.approx(flops["dense"] / flops["pruned"], abs=1e-4)
    for name in ("dense", "pruned"):
        r = report[name]
        assert r["flops_forward"] == flops[name]
        stored = sum(p.numel() * 4 for p in (dense if name == "dense" else pruned).parameters()) / 2**20
        assert r["weights_mb"] == pytest.approx(stored, abs=0.01)  # rounded to 0.01, plus the file's header
        assert r["peak_forward_bs2_mb"] > r["weights_mb"] * 0.9
        for bs, kind, tokens in ((1, "prefill", 16), (2, "prefill", 32), (1, "generate", 4), (2, "generate", 8)):
            seconds = r[f"{kind}_bs{bs}_ms"] / 1000  # throughput is tokens over the same median time
            assert r[f"{kind}_bs{bs}_tokens_per_s"] == pytest.approx(tokens / seconds, rel=0.01)
    for key in ("prefill_bs1", "prefill_bs2", "generate_bs1", "generate_bs2"):
        ratio = report["dense"][f"{key}_ms"] / report["pruned"][f"{key}_ms"]
        assert report[f"speedup_{key}"] == pytest.approx(ratio, rel=1e-3)
    assert report["pruned"]["weights_mb"] < report["dense"]["weights_mb"]


def test_generation_produces_exactly_the_requested_tokens() -> None:
    model = tiny_llama("gqa")
    calls = []
    original = model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        calls.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = spy
    compare_speed({"m": model}, [1], 8, 5, warmup=0, repeats=2)
    assert calls == [5, 5]
