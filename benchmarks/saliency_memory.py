"""Saliency memory and time: the lean scorer (gradients only for prunable weights, micro-batches,
optionally checkpointed) against a naive full-batch backward with every parameter trainable (the
authors' release), on the embedded SmolLM2 and the same calibration windows. Scores must agree.

Each variant runs in its own process, so peaks do not mix. Peak memory is read twice: the process's
lifetime peak (`resource.getrusage`, ru_maxrss, includes loading) and the scoring phase's own peak
(Linux VmHWM, reset with /proc/self/clear_refs just before scoring).

    .venv/bin/python benchmarks/saliency_memory.py            # ~10 min on 2 CPU cores
Writes results/saliency_memory.json and results/saliency_memory.md."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from nirvana.core.data import build_corpora, token_stream, windows
from nirvana.core.params import ModelParams, defaults
from nirvana.method.allocation import allocate, unit_sizes
from nirvana.method.calibration import draw
from nirvana.method.forward import logits_and_labels
from nirvana.method.saliency import enable_checkpointing, nirvana_scores, ntk_objective
from nirvana.method.surgery import save_model
from nirvana.models import get_adapter
from nirvana.models.loading import load_base, load_model

SAMPLES, SEQ_LEN = 32, 128  # the pipeline's default calibration set
VARIANTS = {  # name -> (micro-batch, checkpointing); None = the naive full-batch all-parameter backward
    "naive": None,
    "lean_bs4": (4, False),
    "lean_bs8": (8, False),
    "lean_bs4_checkpointed": (4, True),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def naive_scores(model: torch.nn.Module, calibration: torch.Tensor) -> pd.DataFrame:
    """Every parameter trainable (embeddings and head too), the whole set in one forward and backward."""
    adapter = get_adapter(model.config)
    model.requires_grad_(True)
    logits, labels = logits_and_labels(model, calibration)
    ntk_objective(logits, labels, len(calibration)).backward()
    rows = []
    for index, layer in enumerate(adapter.layers(model)):
        for module in adapter.modules(layer):
            sums = adapter.unit_scores(layer, module, lambda p: (p.detach() * p.grad).abs())
            rows += [(index, module, unit, float(s)) for unit, s in enumerate(sums.tolist())]
    return pd.DataFrame(rows, columns=["layer", "module", "unit", "score"])


def child(variant: str, folder: Path) -> None:
    """Score once with `variant`; write its scores and a JSON line of measurements."""
    model = load_model(folder / "model", on="cpu")
    calibration = load_file(folder / "windows.safetensors")["input_ids"]
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    setting = VARIANTS[variant]
    if setting is None:
        scores = naive_scores(model, calibration)
    else:
        batch_size, checkpointing = setting
        if checkpointing:
            enable_checkpointing(model)
        scores = nirvana_scores(model, calibration, batch_size)
    seconds = time.perf_counter() - start
    scores.to_parquet(folder / f"{variant}.parquet")
    out = {
        "variant": variant,
        "seconds": round(seconds, 2),
        "rss_before_scoring_mb": round(before_kb / 1024, 1),
        "scoring_peak_mb": round(_status_kb("VmHWM") / 1024, 1),
        "scoring_increment_mb": round((_status_kb("VmHWM") - before_kb) / 1024, 1),
        "process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(out))


def prepare(folder: Path) -> dict:
    """The embedded SmolLM2 as a float32 folder, and 32 x 128 calibration windows (seed 0)."""
    model, tokenizer = load_base(defaults(ModelParams))
    save_model(model, tokenizer, folder / "model")
    pool = windows(token_stream(build_corpora(13)["calibration"]["text"].tolist(), tokenizer), SEQ_LEN)
    calibration = pool[torch.from_numpy(draw(pool, SAMPLES, seed=0))]
    save_file({"input_ids": calibration.contiguous()}, folder / "windows.safetensors")
    adapter = get_adapter(model.config)
    prunable = sum(p.numel() for layer in adapter.layers(model) for p in adapter.prunable_params(layer))
    attn, mlp = unit_sizes(model)
    return {
        "params_total": model.num_parameters(),
        "params_prunable": prunable,
        "unit_params": {"attn": attn, "mlp": mlp},
        "windows": list(calibration.shape),
    }


def _rel_diff(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Largest relative difference between two score tables' scores."""
    return float(((a.score - b.score).abs() / b.score.abs().clip(lower=1e-30)).max())


def _same_plans(a: pd.DataFrame, b: pd.DataFrame, sizes: dict) -> bool:
    """Whether two score tables give NIRVANA the same plan at sparsity 0.2 and 0.4."""
    return all(
        (
            allocate(a, p, 3.0, sizes["attn"], sizes["mlp"], 8).keep
            == allocate(b, p, 3.0, sizes["attn"], sizes["mlp"], 8).keep
        ).all()
        for p in (0.2, 0.4)
    )


def markdown(report: dict) -> str:
    lines = [
        "| variant | micro-batch | checkpointing | time (s) | scoring peak RSS (MB) | over the loaded model (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["variants"].items():
        setting = VARIANTS[name]
        batch, ckpt = ("all 32", "no") if setting is None else (str(setting[0]), "yes" if setting[1] else "no")
        lines.append(
            f"| {name} | {batch} | {ckpt} | {r['seconds']} | {r['scoring_peak_mb']} | {r['scoring_increment_mb']} |"
        )
    lines += [
        "",
        f"Lean (micro-batch 4) over naive, scoring peak: {report['lean_over_naive_peak']:.2f}; "
        f"increment: {report['lean_over_naive_increment']:.2f}. Largest relative score difference "
        f"from naive: {report['max_rel_diff']:.2e}; plans at sparsity 0.2 and 0.4 identical: {report['same_plan']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FOLDER"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]))
        return
    with tempfile.TemporaryDirectory(prefix="nirvana-saliency-bench-") as tmp:
        folder = Path(tmp)
        report: dict = {"setup": prepare(folder), "variants": {}}
        for variant in VARIANTS:
            done = subprocess.run(
                [sys.executable, __file__, "--child", variant, tmp], capture_output=True, text=True, check=True
            )
            report["variants"][variant] = json.loads(done.stdout.strip().splitlines()[-1])
            print(report["variants"][variant], flush=True)
        naive = pd.read_parquet(folder / "naive.parquet")
        tables = {variant: pd.read_parquet(folder / f"{variant}.parquet") for variant in VARIANTS}
        report["max_rel_diff"] = max(_rel_diff(t, naive) for t in tables.values())
        report["same_plan"] = all(_same_plans(t, naive, report["setup"]["unit_params"]) for t in tables.values())
        Path("results").mkdir(exist_ok=True)
        Path("results/saliency_memory.json").write_text(json.dumps(report, indent=2) + "\n")
        # float32 sums in another order differ in the last digits; units and plans must not
        assert report["max_rel_diff"] < 1e-3 and report["same_plan"], report
    v = report["variants"]
    report["lean_over_naive_peak"] = v["lean_bs4"]["scoring_peak_mb"] / v["naive"]["scoring_peak_mb"]
    report["lean_over_naive_increment"] = v["lean_bs4"]["scoring_increment_mb"] / v["naive"]["scoring_increment_mb"]
    Path("results").mkdir(exist_ok=True)
    Path("results/saliency_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    Path("results/saliency_memory.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
