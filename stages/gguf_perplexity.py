"""Stage gguf_perplexity (one per model: dense, pruned, fine-tuned): llama.cpp's perplexity of each GGUF file
export_gguf wrote for the model, and transformers' perplexity of the model folder they were written from, both
over the first export.ppl_tokens tokens of `evaluate`'s wiki windows at evaluate.windows[0] and counted as
`evaluate` counts them: the same tokens, so the two numbers compare exactly. A stage per model, apart from the
timing, so that an experiment that changes only the pruned model reuses the dense model's numbers; measure_gguf
gathers the three files into metrics/gguf.json. llama.cpp runs in a child process: if it dies by a signal, the
stage stops with one line naming the file and the signal."""

import json
from pathlib import Path

import torch

from nirvana.core.errors import InputError
from nirvana.core.io import log, write_json
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.deploy.llamacpp import isolated, perplexities
from nirvana.evaluation.perplexity import held_out, perplexity
from nirvana.models.loading import load_model, load_tokenizer
from nirvana.pipeline.checks import check_model


def scored_windows(params: Params, corpora_dir: str, model_dir: str) -> torch.Tensor:
    """The first export.ppl_tokens // evaluate.windows[0] of the wiki windows `evaluate` scores at that length."""
    e, x = params.evaluate, params.export
    wiki = held_out(corpora_dir, "wiki", load_tokenizer(model_dir, params.model), e.max_tokens, e.windows[0])
    count = x.ppl_tokens // e.windows[0]
    if len(wiki) < count:
        raise InputError(
            f"params: export.ppl_tokens = {x.ppl_tokens} asks for {count} wiki windows of {e.windows[0]} tokens; "
            f"{Path(corpora_dir, 'wiki.parquet')} gives {len(wiki)}"
        )
    return wiki[:count]


def main(params: Params, gguf_dir: str, model_dir: str, corpora_dir: str, metrics_out: str) -> None:
    manifest = json.loads(Path(gguf_dir, "export.json").read_text())
    if "unsupported" in manifest:
        write_json({"unsupported": manifest["unsupported"]}, metrics_out)
        log.warning("nothing to measure: %s", manifest["unsupported"])
        return
    e, x = params.evaluate, params.export
    check_model(model_dir, [("evaluate.windows[0]", e.windows[0])])
    windows = scored_windows(params, corpora_dir, model_dir)
    key = f"ppl_wiki_{e.windows[0]}"
    files = {type: Path(gguf_dir, record["gguf"]) for type, record in manifest["exported"].items()}
    threads = min(x.threads, torch.get_num_threads())  # export.threads, or this job's share of the CPUs
    llama = isolated(perplexities, files, windows.tolist(), threads)
    model = load_model(model_dir, params.model)
    ours = perplexity(model, windows, e.batch_size, desc=f"wiki@{e.windows[0]}")
    log.info("transformers over %d tokens: %s %.4f", x.ppl_tokens, key, ours)
    metrics: dict = {"ppl_tokens": x.ppl_tokens, "transformers": {key: round(ours, 4)}}
    for type, ppl in llama.items():
        metrics[type] = {key: round(ppl, 4), "sha256": manifest["exported"][type]["sha256"]}
        log.info("llama.cpp %s over %d tokens: %s %.4f", type, x.ppl_tokens, key, ppl)
    write_json(metrics, metrics_out)


if __name__ == "__main__":
    run_stage("gguf_perplexity", main)
