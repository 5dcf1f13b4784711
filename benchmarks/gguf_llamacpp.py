"""SmolLM2-135M pruned by NIRVANA, run in llama.cpp (llama-cpp-python): file size and fallback tensors per GGUF
type, perplexity next to transformers' on the same windows, prompt and generation throughput of dense and
pruned timed alternately, and the KV-cache size with flash attention on and off.

Pruned models are built from the pipeline's saliency scores (NIRVANA allocation, gamma 3.0) at several
sparsities and `allocation.mlp_multiple` values, saved as pipeline folders under the scratch folder and
exported with `nirvana.deploy.gguf`. Run after `make run` from the project root (the GGUFs go under ./outputs/):
    .venv/bin/python benchmarks/gguf_llamacpp.py outputs --repeats 5
Writes results/gguf_llamacpp.json and results/gguf_llamacpp.md."""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import llama_cpp
import pandas as pd
import torch
from transformers import PreTrainedModel

from nirvana.core.data import EVAL_SETS
from nirvana.core.io import folder_digest
from nirvana.deploy import llamacpp
from nirvana.deploy.gguf import export
from nirvana.deploy.gguf_header import stored_types
from nirvana.evaluation.efficiency import forward_flops
from nirvana.evaluation.perplexity import held_out, param_counts, perplexity
from nirvana.method.allocation import allocate_for_model
from nirvana.method.selection import by_method
from nirvana.method.surgery import layer_units, prune_model, save_model
from nirvana.models.loading import load_model, load_tokenizer
from nirvana.models.widths import CONFIG_KEY

GAMMA, SEQ_LEN, MAX_TOKENS = 3.0, 128, 8192
PROMPT, NEW_TOKENS, THREADS = 128, 64, 2
KV_CTX = 2048  # context of the contexts whose KV cache is reported (llama.cpp allocates all cells up front)
VARIANTS = [(0.2, 8), (0.4, 8), (0.2, 32), (0.2, 256)]  # (sparsity, allocation.mlp_multiple)
KV_LINE = re.compile(
    r"size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers.*?K \((\w+)\): +([\d.]+) MiB, V \((\w+)\): +([\d.]+) MiB"
)

LOG: list[str] = []


@llama_cpp.llama_log_callback
def _capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log, kept instead of printed (the KV-cache sizes are read from it)."""
    LOG.append(text.decode("utf-8", "replace"))


# ---- models and files ----


def name_of(sparsity: float, multiple: int) -> str:
    return f"nirvana-{sparsity}-m{multiple}"


def build_models(outputs: Path, scratch: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """Dense (the pipeline's base_model) and each pruned variant saved as a pipeline folder; per model its
    widths, parameter counts and forward FLOPs."""
    base = outputs / "base_model"
    dense, tokenizer = load_model(base, on="cpu", granularity="group"), load_tokenizer(base)
    scores = by_method(pd.read_parquet(outputs / "saliency.parquet"))["nirvana"]
    folders, info = {"dense": base}, {"dense": describe(dense, dense)}
    for sparsity, multiple in VARIANTS:
        pruned = copy.deepcopy(dense)
        prune_model(pruned, allocate_for_model(dense, scores, sparsity, GAMMA, multiple, "nirvana"))
        name = name_of(sparsity, multiple)
        folders[name] = scratch / "models" / name
        save_model(pruned, tokenizer, folders[name])
        info[name] = describe(dense, pruned) | {"sparsity": sparsity, "mlp_multiple": multiple}
        print(f"built {name}: {info[name]['params_total']:,} parameters", flush=True)
    info[name_of(0.2, 8)]["same_widths_as_pipeline_pruned_model"] = same_widths(outputs, folders[name_of(0.2, 8)])
    return folders, info


def describe(dense: PreTrainedModel, model: PreTrainedModel) -> dict[str, Any]:
    """Widths, parameters, realised sparsity and ideal FLOP ratios (whole forward of PROMPT tokens as
    `forward_flops` counts it, and with the LM head on the last position only, as llama.cpp's prompt runs)."""
    counts, dense_counts = param_counts(model), param_counts(dense)
    head = model.get_output_embeddings()
    head_flops = 2 * (PROMPT - 1) * head.in_features * head.out_features
    flops, dense_flops = forward_flops(model, PROMPT), forward_flops(dense, PROMPT)
    units = layer_units(model)
    return {
        **counts,
        "sparsity_realised": round(1 - counts["params_attn_mlp"] / dense_counts["params_attn_mlp"], 4),
        "kv_groups": [u["attn"] for u in units],
        "mlp_widths": [u["mlp"] for u in units],
        "flops_forward": flops,
        "ideal_flop_ratio": round(dense_flops / flops, 4),
        "ideal_flop_ratio_last_token_head": round((dense_flops - head_flops) / (flops - head_flops), 4),
    }


def same_widths(outputs: Path, folder: Path) -> bool | None:
    """Whether a built model has the widths of the pipeline's own pruned_model (None if there is none)."""
    config = outputs / "pruned_model" / "config.json"
    if not config.is_file():
        return None
    ours = json.loads((folder / "config.json").read_text())[CONFIG_KEY]
    return bool(json.loads(config.read_text())[CONFIG_KEY] == ours)


def export_all(folders: dict[str, Path], types: list[str], scratch: Path, reuse: bool) -> dict[str, dict[str, dict]]:
    """Every model in every type; with `reuse`, a GGUF whose record names the same source digest is kept."""
    out: dict[str, dict[str, dict]] = {}
    for name, folder in folders.items():
        out[name] = {}
        for type in types:
            path = scratch / f"{name}-{type}.gguf"
            out[name][type] = export_one(folder, path, type, reuse)
            print(f"exported {path.name}: {out[name][type]['bytes']:,} bytes", flush=True)
    return out


def export_one(folder: Path, path: Path, type: str, reuse: bool) -> dict[str, Any]:
    """Export (or reuse) one GGUF; its size, fallback tensors and the storage types of its matrices."""
    record_path = path.with_name(path.name + ".json")
    record = json.loads(record_path.read_text()) if reuse and record_path.is_file() and path.is_file() else None
    if record is None or record["type"] != type or record["source"]["digest"] != folder_digest(folder):
        start = time.perf_counter()
        record = export(folder, path, type)
        record["export_s"] = round(time.perf_counter() - start, 1)
    matrices = Counter(t.name.lower() for dims, t in stored_types(path).values() if dims >= 2)
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "fallbacks": record["fallbacks"],
        "fallback_tensors": record["fallback_tensors"],
        "matrix_types": dict(sorted(matrices.items())),
        "export_s": record.get("export_s"),
    }


# ---- perplexity ----


def eval_windows(outputs: Path, folder: Path) -> dict[str, torch.Tensor]:
    """The windows `evaluate` scores: the first MAX_TOKENS of each held-out set in SEQ_LEN-token windows."""
    tokenizer = load_tokenizer(folder)
    return {name: held_out(outputs / "corpora", name, tokenizer, MAX_TOKENS, SEQ_LEN) for name in EVAL_SETS}


def ppl_cpp(path: Path, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    """llama.cpp perplexity of a GGUF per held-out set (default f16 KV cache, flash attention off)."""
    return {name: round(llamacpp.perplexity(path, cut, THREADS), 4) for name, cut in sets.items()}


def ppl_hf(folder: Path, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    """transformers (float32) perplexity of the model folder on the same windows, as `evaluate` computes it."""
    model = load_model(folder, on="cpu")
    return {name: round(perplexity(model, cut, 8, desc=f"{folder.name} {name}"), 4) for name, cut in sets.items()}


# ---- speed ----


def open_model(path: Path, n_ctx: int, flash: bool) -> llama_cpp.Llama:
    """A llama.cpp context with THREADS threads, batches of PROMPT tokens, last-token logits only."""
    return llamacpp.open_model(path, n_ctx, THREADS, PROMPT, flash=flash)


def speed(paths: dict[str, Path], prompt: list[int], flash: bool, warmup: int, repeats: int) -> dict[str, dict]:
    """Median prompt and generation throughput of every model, timed alternately (nirvana.deploy.llamacpp.speed)."""
    return llamacpp.speed(paths, prompt, NEW_TOKENS, THREADS, warmup, repeats, flash)


# ---- KV cache ----


def kv_cache(path: Path, flash: bool) -> dict[str, Any]:
    """The KV cache llama.cpp allocates for a KV_CTX context, as its log reports it (`llama_kv_cache: size =
    ... K (f16): ... MiB, V (f16): ... MiB`), and whether it warned that it padded V to the widest layer."""
    LOG.clear()
    open_model(path, KV_CTX, flash).close()
    text = "".join(LOG)
    match = KV_LINE.search(text)
    if match is None:
        raise RuntimeError(f"llama.cpp logged no KV-cache size for {path.name}")
    total, cells, layers, k_type, k_mib, v_type, v_mib = match.groups()
    return {
        "cells": int(cells),
        "layers": int(layers),
        "k_type": k_type,
        "v_type": v_type,
        "k_mib": float(k_mib),
        "v_mib": float(v_mib),
        "total_mib": float(total),
        "v_padded_warning": "padding V cache" in text,
    }


def kv_expected(kv_groups: list[int], head_dim: int, flash: bool) -> float:
    """MiB of an f16 KV cache of KV_CTX cells from the widths: K per layer at its own width, V too with flash
    attention, V at the widest layer's width in every layer without it (llama.cpp stores V transposed then)."""
    k = sum(kv_groups)
    v = k if flash else max(kv_groups) * len(kv_groups)
    return (k + v) * head_dim * KV_CTX * 2 / 2**20


# ---- report ----


def speedups(report: dict) -> list[dict[str, Any]]:
    """Per type, flash setting and pruned model: measured speedups next to the ideal ratios, and the targets
    (generation >= 0.9 x the file-bytes ratio, prompt >= 0.9 x the ideal FLOP ratio)."""
    rows = []
    for flash, by_type in report["speed"].items():
        for type, by_model in by_type.items():
            dense = by_model["dense"]
            for name, measured in by_model.items():
                if name == "dense":
                    continue
                info, files = report["models"][name], report["files"]
                bytes_ratio = files["dense"][type]["bytes"] / files[name][type]["bytes"]
                prompt = measured["prompt_tokens_per_s"] / dense["prompt_tokens_per_s"]
                gen = measured["gen_tokens_per_s"] / dense["gen_tokens_per_s"]
                ideal = info["ideal_flop_ratio"]
                rows.append(
                    {
                        "flash_attn": flash,
                        "type": type,
                        "model": name,
                        "bytes_ratio": round(bytes_ratio, 4),
                        "ideal_flop_ratio": ideal,
                        "ideal_flop_ratio_last_token_head": info["ideal_flop_ratio_last_token_head"],
                        "prompt_speedup": round(prompt, 4),
                        "gen_speedup": round(gen, 4),
                        "prompt_over_ideal": round(prompt / ideal, 3),
                        "prompt_over_ideal_last_token_head": round(
                            prompt / info["ideal_flop_ratio_last_token_head"], 3
                        ),
                        "gen_over_bytes": round(gen / bytes_ratio, 3),
                        "prompt_target_met": prompt >= 0.9 * ideal,
                        "gen_target_met": gen >= 0.9 * bytes_ratio,
                    }
                )
    return rows


def markdown(report: dict) -> str:
    """Up to three tables, as far as the run got: per model and type the file and its perplexities; the
    measured speedups; the KV cache."""
    lines = [
        f"SmolLM2-135M in llama.cpp (llama-cpp-python {report['llama_cpp_python']}), {report['machine']['cpu']}, "
        f"{report['threads']} threads, prompt {PROMPT} tokens, {NEW_TOKENS} generated, median of "
        f"{report['repeats']} alternating runs after {report['warmup']} warm-up. Phases done: "
        f"{', '.join(report['phases_done'])}.",
        "",
        "| model | type | MiB | fallbacks | matrix types | wiki ppl llama.cpp (transformers) "
        "| books ppl llama.cpp (transformers) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_type in report["files"].items():
        hf = report["models"][name].get("ppl_transformers")
        for type, f in by_type.items():
            cpp = f.get("ppl_llama_cpp")
            ppl = [f"{cpp[s]:.2f} ({hf[s]:.2f})" if cpp and hf else "-" for s in ("wiki", "books")]
            kinds = ", ".join(f"{k} {n}" for k, n in f["matrix_types"].items())
            lines.append(
                f"| {name} | {type} | {f['bytes'] / 2**20:.1f} | {f['fallbacks']} | {kinds} | {ppl[0]} | {ppl[1]} |"
            )
    lines += [
        "",
        "| flash attn | type | model | bytes ratio | ideal FLOP ratio | prompt speedup | generation speedup "
        "| prompt / ideal | generation / bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.get("speedups", []):
        lines.append(
            f"| {r['flash_attn']} | {r['type']} | {r['model']} | x{r['bytes_ratio']:.2f} "
            f"| x{r['ideal_flop_ratio']:.2f} | x{r['prompt_speedup']:.2f} | x{r['gen_speedup']:.2f} "
            f"| {r['prompt_over_ideal']:.2f} | {r['gen_over_bytes']:.2f} |"
        )
    lines += ["", "| model | KV MiB, flash off (K + V) | KV MiB, flash on (K + V) |", "|---|---|---|"]
    for name, info in report["models"].items():
        if "kv_cache" in info:
            off, on = info["kv_cache"]["off"], info["kv_cache"]["on"]
            lines.append(
                f"| {name} | {off['total_mib']:.2f} ({off['k_mib']:.2f} + {off['v_mib']:.2f}) "
                f"| {on['total_mib']:.2f} ({on['k_mib']:.2f} + {on['v_mib']:.2f}) |"
            )
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    """CPU model and core count, the instruction sets llama.cpp was built for, and the load average when the
    report was written (other work on the machine skews the timings)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
    }


def measure_kv(folders: dict[str, Path], files: dict, models: dict) -> None:
    """Into `models`: each model's KV cache with flash attention off and on, as logged and as computed."""
    head_dim = int(json.loads((folders["dense"] / "config.json").read_text()).get("head_dim") or 64)
    for name in folders:
        gguf = Path(next(iter(files[name].values()))["path"])  # the cache holds activations: any type will do
        groups = models[name]["kv_groups"]
        models[name]["kv_cache"] = {
            label: kv_cache(gguf, flash) | {"expected_mib": round(kv_expected(groups, head_dim, flash), 2)}
            for label, flash in (("off", False), ("on", True))
        }


def measure_ppl(folders: dict[str, Path], files: dict, models: dict, sets: dict, type: str) -> None:
    """Into `files`: llama.cpp perplexity of every model's GGUF of `type`; into `models` (once): transformers'."""
    for name, folder in folders.items():
        if "ppl_transformers" not in models[name]:
            models[name]["ppl_transformers"] = ppl_hf(folder, sets)
        hf, f = models[name]["ppl_transformers"], files[name][type]
        cpp = f["ppl_llama_cpp"] = ppl_cpp(Path(f["path"]), sets)
        f["ppl_ratio_to_transformers"] = {s: round(cpp[s] / hf[s], 4) for s in sets}
        print(f"{name} {type}: llama.cpp {cpp}, transformers {hf}", flush=True)


def measure_speed(files: dict, types: list[str], prompt: list[int], warmup: int, repeats: int) -> dict[str, dict]:
    """Throughput of every model per flash-attention setting and type (`speed`)."""
    out: dict[str, dict[str, dict]] = {}
    for label, flash in (("off", False), ("on", True)):
        out[label] = {}
        for type in types:
            paths = {name: Path(by_type[type]["path"]) for name, by_type in files.items()}
            out[label][type] = speed(paths, prompt, flash, warmup, repeats)
            summary = {n: (v["prompt_tokens_per_s"], v["gen_tokens_per_s"]) for n, v in out[label][type].items()}
            print(f"flash {label} {type} (prompt, generation tokens/s): {summary}", flush=True)
    return out


def save(report: dict[str, Any], started: float, done: str) -> None:
    """Write the report as far as it got (`phases_done`), JSON and markdown."""
    report["phases_done"] = [*report.get("phases_done", []), done]
    report["machine"] = machine()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if "speed" in report:
        report["speedups"] = speedups(report)
    Path("results").mkdir(exist_ok=True)
    Path("results/gguf_llamacpp.json").write_text(json.dumps(report, indent=1) + "\n")
    Path("results/gguf_llamacpp.md").write_text(markdown(report))
    print(f"[{report['wall_s']:.0f} s] {done} done", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="?", default="outputs", help="a finished pipeline's outputs/ folder")
    parser.add_argument("--scratch", default="outputs/gguf_llamacpp", help="pruned folders and GGUFs (in outputs/)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--ppl-types", nargs="*", default=None, help="types whose llama.cpp perplexity is measured")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reuse", action="store_true", help="keep GGUFs exported earlier from the same folders")
    args = parser.parse_args()
    outputs, scratch = Path(args.outputs), Path(args.scratch)
    llama_cpp.llama_log_set(_capture, ctypes.c_void_p(0))
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine(),
        "threads": THREADS,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "llama_cpp_python": llama_cpp.__version__,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW_TOKENS,
        "kv_ctx": KV_CTX,
    }
    folders, report["models"] = build_models(outputs, scratch)
    report["files"] = export_all(folders, args.types, scratch, args.reuse)
    save(report, started, "export")
    sets = eval_windows(outputs, folders["dense"])
    report["speed"] = measure_speed(
        report["files"], args.types, sets["wiki"][0].tolist()[:PROMPT], args.warmup, args.repeats
    )
    save(report, started, "speed")
    measure_kv(folders, report["files"], report["models"])
    save(report, started, "kv_cache")
    ppl_types = args.types if args.ppl_types is None else args.ppl_types
    report["perplexity"] = {"seq_len": SEQ_LEN, "max_tokens": MAX_TOKENS, "types": ppl_types}
    report["perplexity"]["windows"] = {s: len(c) for s, c in sets.items()}
    for type in ppl_types:  # saved after each type: a run cut short keeps what it measured
        measure_ppl(folders, report["files"], report["models"], sets, type)
        save(report, started, f"perplexity {type}")
    print(markdown(report))


if __name__ == "__main__":
    main()
