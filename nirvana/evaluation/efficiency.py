"""Size, memory and speed of models, measured side by side so that ratios can be trusted."""

from __future__ import annotations

import functools
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel

from nirvana.core.environment import PORTABLE, kernels_in_force
from nirvana.core.params import EfficiencyParams, ModelParams
from nirvana.method.forward import is_seq2seq, model_inputs
from nirvana.models import get_adapter
from nirvana.models.loading import load_model


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the safetensors weight files in a model folder."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def forward_flops(model: PreTrainedModel, seq_len: int) -> int:
    """Multiply-add FLOPs (x2) of one forward pass over `seq_len` tokens: every linear layer,
    the LM head included, plus attention scores and their weighted sum (QK^T and AV). An
    encoder-decoder model reads half the window in each stack (`nirvana.method.forward`)."""
    seq_len = seq_len // 2 if is_seq2seq(model) else seq_len
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    adapter = get_adapter(model.config)
    query_width = sum(
        adapter.query_width(layer, m) for layer in adapter.layers(model) for m in adapter.modules(layer) if m != "mlp"
    )
    return 2 * seq_len * linear + 2 * 2 * seq_len * seq_len * query_width


@torch.no_grad()
def peak_forward_bytes(model: PreTrainedModel, input_ids: torch.Tensor) -> int:
    """Weights plus the peak of memory allocated during one forward pass."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(**model_inputs(model, input_ids), use_cache=False)
        return weights + torch.cuda.max_memory_allocated() - before
    # On the CPU: replay the profiler's allocations and frees (each op's own net bytes) in order.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**model_inputs(model, input_ids), use_cache=False)
    level = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return weights + peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_timings(
    runs: Mapping[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds of each callable, alternating between them on every repeat so that the
    machine's drift hits all of them alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _prefill(model: PreTrainedModel, ids: torch.Tensor) -> object:
    return model(**model_inputs(model, ids), use_cache=False)


def _generate(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> object:
    """Exactly `new_tokens` greedy tokens per sequence (no early stop at EOS)."""
    return model.generate(  # type: ignore[operator]  # GenerationMixin is mixed in at runtime
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


@torch.no_grad()
def compare_speed(
    models: dict[str, PreTrainedModel],
    batch_sizes: list[int],
    prompt_len: int,
    new_tokens: int,
    warmup: int,
    repeats: int,
) -> dict[str, dict[str, float]]:
    """Prefill and generation latency (ms) and throughput (tokens/s) of each model per batch size."""
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for bs in batch_sizes:
        ids = torch.randint(
            0, first.config.vocab_size, (bs, prompt_len), generator=torch.Generator().manual_seed(bs)
        ).to(device)
        prefill = {n: functools.partial(_prefill, m, ids) for n, m in models.items()}
        generate = {n: functools.partial(_generate, m, ids, new_tokens) for n, m in models.items()}
        for kind, runs, tokens in (("prefill", prefill, bs * prompt_len), ("generate", generate, bs * new_tokens)):
            for name, seconds in interleaved_timings(runs, device, warmup, repeats).items():
                out[name][f"{kind}_bs{bs}_ms"] = round(seconds * 1000, 2)
                out[name][f"{kind}_bs{bs}_tokens_per_s"] = round(tokens / seconds, 1)
    return out


def efficiency_report(
    dense: PreTrainedModel, pruned: PreTrainedModel, dense_dir: str | Path, pruned_dir: str | Path, f: EfficiencyParams
) -> dict:
    """Size, peak forward memory and speed of both models, measured speedups next to the ideal
    one (dense over pruned FLOPs of a whole forward pass of `prompt_len` tokens)."""
    models, dirs = {"dense": dense, "pruned": pruned}, {"dense": dense_dir, "pruned": pruned_dir}
    speed = compare_speed(models, f.batch_sizes, f.prompt_len, f.new_tokens, f.warmup, f.repeats)
    device = next(dense.parameters()).device
    ids = torch.randint(
        0, dense.config.vocab_size, (max(f.batch_sizes), f.prompt_len), generator=torch.Generator().manual_seed(0)
    ).to(device)
    report: dict = {}
    for name, model in models.items():
        report[name] = {
            "params_total": sum(p.numel() for p in model.parameters()),
            "weights_mb": round(weights_bytes(dirs[name]) / 2**20, 2),
            f"peak_forward_bs{max(f.batch_sizes)}_mb": round(peak_forward_bytes(model, ids) / 2**20, 2),
            "flops_forward": forward_flops(model, f.prompt_len),
            **speed[name],
        }
    report["speedup_ideal"] = round(report["dense"]["flops_forward"] / report["pruned"]["flops_forward"], 4)
    for key, dense_ms in speed["dense"].items():
        if key.endswith("_ms"):
            report[f"speedup_{key.removesuffix('_ms')}"] = round(dense_ms / speed["pruned"][key], 4)
    return report


def native_report(
    dense_dir: str | Path, pruned_dir: str | Path, model: ModelParams, f: EfficiencyParams, threads: int
) -> dict:
    """`efficiency_report` in a spawned child on this machine's own CPU kernels (the stage's pin left out of its
    environment), so the timings are those users deploy with; the portable kernels run GEMMs about half as fast
    (benchmarks/cpu_kernels.py). Nothing but the timings depends on the code path. `torch_cpu`: what ran."""
    saved = {key: os.environ.pop(key) for key in PORTABLE if key in os.environ}
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_report, str(dense_dir), str(pruned_dir), model, f, threads).result()
    finally:
        os.environ.update(saved)


def _report(dense_dir: str, pruned_dir: str, model: ModelParams, f: EfficiencyParams, threads: int) -> dict:
    torch.set_num_threads(threads)
    dense, pruned = load_model(dense_dir, model), load_model(pruned_dir, model)
    return efficiency_report(dense, pruned, dense_dir, pruned_dir, f) | {"torch_cpu": kernels_in_force()}
