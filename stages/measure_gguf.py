"""Stage measure_gguf: the exported GGUF files in llama.cpp: size, fallback tensors, perplexity on
`evaluate`'s wiki windows, and prompt and generation throughput of dense, pruned and fine-tuned
timed alternately, with the speedups next to the ideal FLOP ratio and the file-bytes ratio. A stage
apart from export_gguf so that re-exporting identical files does not re-time them. llama.cpp runs in a
child process: if it dies by a signal, the stage stops with one line naming the file and the signal.
The throughputs and speedups go to their own file, with the machine that made them (nirvana.timings)."""

import json
from importlib.metadata import version
from pathlib import Path

import torch

from nirvana.checks import check_model
from nirvana.efficiency import forward_flops
from nirvana.environment import machine
from nirvana.evaluation import held_out
from nirvana.io import log, write_json
from nirvana.llamacpp import isolated, measure
from nirvana.modeling import load_tokenizer, skeleton
from nirvana.params import Params
from nirvana.stage import run_stage
from nirvana.timings import split


def wiki_windows(params: Params, corpora_dir: str, tokenizer_dir: str) -> tuple[str, torch.Tensor]:
    """The wiki windows `evaluate` scores at its first window length, and its metric name (books, twice
    the llama.cpp time, is in benchmarks/gguf_llamacpp.py)."""
    e = params.evaluate
    wiki = held_out(corpora_dir, "wiki", load_tokenizer(tokenizer_dir), e.max_tokens, e.windows[0])
    return f"ppl_wiki_{e.windows[0]}", wiki


def main(
    params: Params, gguf_dir: str, corpora_dir: str, dense_dir: str, pruned_dir: str, metrics_out: str, timings_out: str
) -> None:
    x = params.export
    threads = min(x.threads, torch.get_num_threads())  # export.threads, or this job's share of the CPUs
    manifest = json.loads(Path(gguf_dir, "export.json").read_text())
    if "unsupported" in manifest:
        write_json({"unsupported": manifest["unsupported"]}, metrics_out)
        write_json({"machine": machine()}, timings_out)
        log.warning("nothing to measure: %s", manifest["unsupported"])
        return
    check_model(dense_dir, [("export.prompt_len + export.new_tokens", x.prompt_len + x.new_tokens)])
    ppl_key, wiki = wiki_windows(params, corpora_dir, dense_dir)
    prompt = wiki.flatten()[: x.prompt_len].tolist()  # held-out text, not random ids
    dense, pruned = (forward_flops(skeleton(folder), x.prompt_len) for folder in (dense_dir, pruned_dir))
    report: dict = {
        "llama_cpp_python": version("llama-cpp-python"),
        "threads": threads,
        "flash_attn": False,
        "ideal_flop_ratio": round(dense / pruned, 4),
        "pruned_digest": next(iter(manifest["exported"]["pruned"].values()))["source"]["digest"],
    }
    files = {
        type: {name: Path(gguf_dir, exported[type]["gguf"]) for name, exported in manifest["exported"].items()}
        for type in x.types
    }
    measured = isolated(measure, files, wiki.tolist(), prompt, x.new_tokens, threads, x.warmup, x.repeats)
    for type, by_name in measured.items():
        by_model: dict = {}
        for name, m in by_name.items():
            by_model[name] = {
                "mib": round(files[type][name].stat().st_size / 2**20, 2),
                "fallbacks": manifest["exported"][name][type]["fallbacks"],
                ppl_key: round(m["ppl"], 4),
                "prompt_tokens_per_s": m["prompt_tokens_per_s"],
                "gen_tokens_per_s": m["gen_tokens_per_s"],
            }
            log.info("%s %s: %s", name, type, by_model[name])
        for name in ("pruned", "finetuned"):
            m, d = by_model[name], by_model["dense"]
            by_model[f"{name}_bytes_ratio"] = round(d["mib"] / m["mib"], 4)
            by_model[f"{name}_prompt_speedup"] = round(m["prompt_tokens_per_s"] / d["prompt_tokens_per_s"], 4)
            by_model[f"{name}_gen_speedup"] = round(m["gen_tokens_per_s"] / d["gen_tokens_per_s"], 4)
        report[type] = by_model
    results, timed = split(report)
    write_json(results, metrics_out)
    write_json(timed | {"machine": machine()}, timings_out)


if __name__ == "__main__":
    run_stage("measure_gguf", main)
