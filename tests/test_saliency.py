"""Saliency equals a brute-force per-weight computation, and micro-batching changes nothing."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from conftest import tiny_llama, tiny_t5
from nirvana.method.forward import logits_and_labels
from nirvana.method.saliency import enable_checkpointing, nirvana_scores, ntk_objective
from nirvana.models import get_adapter

WINDOWS = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(5))


def f(model: torch.nn.Module) -> float:
    """The method's output function in float64: mean over (sample, vocab) of max over positions."""
    with torch.no_grad():
        return model(input_ids=WINDOWS).logits.double().max(dim=1).values.mean().item()


def brute_force_unit_scores(model: torch.nn.Module) -> dict[tuple[int, str, int], float]:
    """|w * df/dw| per weight by central differences, summed over hand-listed unit members."""
    c = model.config
    d, n_rep = c.head_dim, c.num_attention_heads // c.num_key_value_heads
    scores: dict[tuple[int, str, int], float] = {}
    for index, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        members = {
            ("attn", g): [(a.q_proj.weight, r, None) for r in range(g * n_rep * d, (g + 1) * n_rep * d)]
            + [(w, r, None) for w in (a.k_proj.weight, a.v_proj.weight) for r in range(g * d, (g + 1) * d)]
            + [(a.o_proj.weight, None, col) for col in range(g * n_rep * d, (g + 1) * n_rep * d)]
            for g in range(c.num_key_value_heads)
        }
        members |= {
            ("mlp", ch): [(m.gate_proj.weight, ch, None), (m.up_proj.weight, ch, None), (m.down_proj.weight, None, ch)]
            for ch in range(c.intermediate_size)
        }
        for (module, unit), parts in members.items():
            total = 0.0
            for weight, row, col in parts:
                rows = range(weight.shape[0]) if row is None else [row]
                cols = range(weight.shape[1]) if col is None else [col]
                for i in rows:
                    for j in cols:
                        total += abs(weight[i, j].item() * _derivative(model, weight, i, j))
            scores[(index, module, unit)] = total
    return scores


def _derivative(model: torch.nn.Module, weight: torch.Tensor, i: int, j: int, eps: float = 1e-6) -> float:
    with torch.no_grad():
        original = weight[i, j].item()
        weight[i, j] = original + eps
        up = f(model)
        weight[i, j] = original - eps
        down = f(model)
        weight[i, j] = original
    return (up - down) / (2 * eps)


def _rms_norm_in_input_dtype(self: LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_matches_brute_force_per_weight_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    # HF's RMSNorm computes in float32; finite differences need the whole forward in float64.
    monkeypatch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    model = tiny_llama(
        "gqa",
        dtype=torch.float64,
        hidden_size=8,
        intermediate_size=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=2,
    )
    expected = brute_force_unit_scores(model)
    table = nirvana_scores(model, WINDOWS, batch_size=len(WINDOWS))
    got = {(r.layer, r.module, r.unit): r.score for r in table.itertuples()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert abs(got[key] - value) <= 1e-4 * abs(value) + 1e-9, key


def test_micro_batches_equal_the_full_batch(kind: str) -> None:
    model = tiny_llama(kind)
    full = nirvana_scores(model, WINDOWS, batch_size=len(WINDOWS))
    for batch_size in (1, 3):
        micro = nirvana_scores(model, WINDOWS, batch_size=batch_size)
        torch.testing.assert_close(torch.tensor(micro.score.values), torch.tensor(full.score.values), rtol=1e-5, atol=0)


def test_leaves_no_gradients_behind() -> None:
    model = tiny_llama("gqa")
    nirvana_scores(model, WINDOWS, batch_size=2)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def naive_scores(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The release's way: every parameter trainable, the whole set in one forward and one backward."""
    adapter = get_adapter(model.config)
    model.requires_grad_(True)
    logits, labels = logits_and_labels(model, windows)
    ntk_objective(logits, labels, len(windows)).backward()
    per_weight = lambda p: (p.detach() * p.grad).abs()  # noqa: E731
    scores = [
        adapter.unit_scores(layer, m, per_weight) for layer in adapter.layers(model) for m in adapter.modules(layer)
    ]
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return torch.cat(scores)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lean_scores_equal_the_naive_full_batch_backward(checkpointing: bool) -> None:
    model = tiny_llama("gqa_bias")
    expected = naive_scores(model, WINDOWS)
    if checkpointing:
        enable_checkpointing(model)
    lean = nirvana_scores(model, WINDOWS, batch_size=2)
    torch.testing.assert_close(torch.tensor(lean.score.values, dtype=torch.float32), expected, rtol=1e-5, atol=0)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())


def test_t5_checkpointed_scores_stay_in_eval_mode() -> None:
    """T5 has dropout: checkpointing must not switch it on (scores would then vary run to run)."""
    model = tiny_t5("relu")
    model.config.dropout_rate = 0.5
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    plain = nirvana_scores(model, WINDOWS, batch_size=2)
    enable_checkpointing(model)
    checkpointed = nirvana_scores(model, WINDOWS, batch_size=2)
    torch.testing.assert_close(
        torch.tensor(checkpointed.score.values), torch.tensor(plain.score.values), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.tensor(plain.score.values, dtype=torch.float32), naive_scores(model, WINDOWS), rtol=1e-5, atol=0
    )
