"""Stage evaluate: perplexity on the held-out sets, zero-shot accuracy, and model size."""

from nirvana.core.data import EVAL_SETS
from nirvana.core.io import folder_digest, log, write_json
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.evaluation.perplexity import held_out, param_counts, perplexity
from nirvana.evaluation.zeroshot import check_zero_shot, zero_shot
from nirvana.models.loading import load_model, load_tokenizer
from nirvana.pipeline.checks import check_model


def main(params: Params, model_dir: str, corpora_dir: str, metrics_out: str, info_out: str) -> None:
    e = params.evaluate
    check_zero_shot(e.tasks)  # an unknown task stops here, before any model work
    check_model(model_dir, [(f"evaluate.windows[{i}]", w) for i, w in enumerate(e.windows)])
    model, tokenizer = load_model(model_dir, params.model), load_tokenizer(model_dir, params.model)
    metrics: dict = param_counts(model) | {"model_digest": folder_digest(model_dir)}
    for name in EVAL_SETS:
        for seq_len in e.windows:
            cut = held_out(corpora_dir, name, tokenizer, e.max_tokens, seq_len)
            ppl = perplexity(model, cut, e.batch_size, desc=f"{name}@{seq_len}")
            metrics[f"ppl_{name}_{seq_len}"] = round(ppl, 4)
            log.info("%s perplexity at %d-token windows: %.3f", name, seq_len, ppl)
    accuracies, info = zero_shot(model, tokenizer, e.tasks, e.limit, e.batch_size)
    metrics |= {k: round(v, 4) for k, v in accuracies.items()}
    log.info("zero-shot average over %d tasks (limit %s): %.4f", len(e.tasks), e.limit, accuracies["acc_average"])
    write_json(metrics, metrics_out)
    write_json(info, info_out)
    log.info("wrote %s and %s", metrics_out, info_out)


if __name__ == "__main__":
    run_stage("evaluate", main)
