"""Stage measure_gguf: the exported GGUF files in llama.cpp: size, fallback tensors, and prompt and generation
throughput of dense, pruned and fine-tuned timed alternately, with the speedups next to the ideal FLOP ratio and
the file-bytes ratio; it gathers gguf_perplexity's three files (llama.cpp and transformers perplexity) into the
same record. Each round times every model once, so a speedup is the median of its rounds' ratios; rounds are
added after export.repeats until every speedup's standard error is at most export.spread, or export.max_repeats
ran (a warning then names the speedups still above it). A stage apart from export_gguf so that re-exporting
identical files does not re-time them. llama.cpp runs in a child process: if it dies by a signal, the stage stops
with one line naming the file and the signal. The throughputs, speedups, spreads and rounds go to their own file,
with the machine that made them (nirvana.evaluation.timings)."""

import functools
import json
from importlib.metadata import version
from pathlib import Path

import torch

from nirvana.core.environment import machine
from nirvana.core.errors import InputError
from nirvana.core.io import log, write_json
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.deploy.llamacpp import isolated, timed
from nirvana.evaluation.efficiency import forward_flops
from nirvana.evaluation.perplexity import held_out
from nirvana.evaluation.timings import more_rounds, paired_speedups, split, wide_spreads
from nirvana.models.loading import load_tokenizer, skeleton
from nirvana.pipeline.checks import check_model

MODELS = ("dense", "pruned", "finetuned")  # the order of the GGUF folders and perplexity files on the command line


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def measured_perplexity(path: str, manifest: dict, gguf_dir: str, types: list[str]) -> dict:
    """gguf_perplexity's record of one model, checked to be about the files in `gguf_dir`."""
    record = read_json(path)
    for type in types:
        if record.get(type, {}).get("sha256") != manifest["exported"][type]["sha256"]:
            raise InputError(f"{path}: measured another {type} file than {gguf_dir} holds; rerun gguf_perplexity")
    return record


def timed_prompt(params: Params, corpora_dir: str, tokenizer_dir: str) -> list[int]:
    """The first export.prompt_len tokens of the wiki windows `evaluate` scores at its first length: held-out
    text, not random ids."""
    e = params.evaluate
    wiki = held_out(corpora_dir, "wiki", load_tokenizer(tokenizer_dir), e.max_tokens, e.windows[0])
    return wiki.flatten()[: params.export.prompt_len].tolist()


def model_record(file: Path, exported: dict, key: str, ppl: float, speed: dict) -> dict:
    """One model at one GGUF type: size, fallback tensors, llama.cpp perplexity (`key`), the median throughputs
    and each round's seconds."""
    return {
        "mib": round(file.stat().st_size / 2**20, 2),
        "fallbacks": exported["fallbacks"],
        key: ppl,
        "prompt_tokens_per_s": speed["prompt_tokens_per_s"],
        "gen_tokens_per_s": speed["gen_tokens_per_s"],
        "prompt_seconds": speed["prompt_s"],
        "gen_seconds": speed["gen_s"],
    }


def speedups(type: str, by_name: dict[str, dict], target: float) -> dict:
    """The pruned and fine-tuned models' paired speedups over dense at one GGUF type, their spreads and the
    rounds; a warning for each spread the rounds left above `target` (export.max_repeats ran out)."""
    rounds = {name: list(zip(m["prompt_s"], m["gen_s"], strict=True)) for name, m in by_name.items()}
    out = paired_speedups(rounds, "dense")
    for wide in wide_spreads(rounds, "dense", target):
        spread = out[f"{wide}_spread"]
        log.warning(
            "%s %s: spread %s after %d rounds, above export.spread %s; raise export.max_repeats or time on an "
            "idle machine", type, wide, "unknown" if spread is None else spread, out["rounds"], target,
        )  # fmt: skip
    return out


def main(
    params: Params,
    dense_gguf: str,
    pruned_gguf: str,
    finetuned_gguf: str,
    dense_ppl: str,
    pruned_ppl: str,
    finetuned_ppl: str,
    corpora_dir: str,
    dense_dir: str,
    pruned_dir: str,
    metrics_out: str,
    timings_out: str,
) -> None:
    x = params.export
    threads = min(x.threads, torch.get_num_threads())  # export.threads, or this job's share of the CPUs
    folders = dict(zip(MODELS, (dense_gguf, pruned_gguf, finetuned_gguf), strict=True))
    manifests = {name: read_json(Path(folder, "export.json")) for name, folder in folders.items()}
    unsupported = [m["unsupported"] for m in manifests.values() if "unsupported" in m]
    if unsupported:
        write_json({"unsupported": unsupported[0]}, metrics_out)
        write_json({"machine": machine()}, timings_out)
        log.warning("nothing to measure: %s", unsupported[0])
        return
    check_model(dense_dir, [("export.prompt_len + export.new_tokens", x.prompt_len + x.new_tokens)])
    paths = dict(zip(MODELS, (dense_ppl, pruned_ppl, finetuned_ppl), strict=True))
    ppl = {name: measured_perplexity(paths[name], manifests[name], folders[name], x.types) for name in MODELS}
    (key,) = ppl["dense"]["transformers"]
    prompt = timed_prompt(params, corpora_dir, dense_dir)
    dense, pruned = (forward_flops(skeleton(folder), x.prompt_len) for folder in (dense_dir, pruned_dir))
    report: dict = {
        "llama_cpp_python": version("llama-cpp-python"),
        "threads": threads,
        "flash_attn": False,
        "ideal_flop_ratio": round(dense / pruned, 4),
        "pruned_digest": next(iter(manifests["pruned"]["exported"].values()))["source"]["digest"],
        "ppl_tokens": ppl["dense"]["ppl_tokens"],
        "transformers": {name: ppl[name]["transformers"] for name in MODELS},
    }
    files = {
        type: {name: Path(folders[name], manifests[name]["exported"][type]["gguf"]) for name in MODELS}
        for type in x.types
    }
    more = functools.partial(more_rounds, reference="dense", target=x.spread, most=x.max_repeats)
    measured = isolated(timed, files, prompt, x.new_tokens, threads, x.warmup, x.repeats, more)
    for type, by_name in measured.items():
        models = {
            name: model_record(files[type][name], manifests[name]["exported"][type], key, ppl[name][type][key], m)
            for name, m in by_name.items()
        }
        ratios = {f"{name}_bytes_ratio": round(models["dense"]["mib"] / models[name]["mib"], 4) for name in MODELS[1:]}
        report[type] = models | ratios | speedups(type, by_name, x.spread)
        log.info("%s: %s", type, {k: v for k, v in report[type].items() if k.endswith(("speedup", "rounds"))})
    results, timings = split(report)
    write_json(results, metrics_out)
    write_json(timings | {"machine": machine()}, timings_out)


if __name__ == "__main__":
    run_stage("measure_gguf", main)
