"""Stage evaluate: perplexity on the held-out sets at each window length, and model size."""

import pandas as pd

from nirvana.data import EVAL_SETS, token_stream, windows
from nirvana.evaluation import param_counts, perplexity
from nirvana.io import log, write_json
from nirvana.modeling import load_model, load_tokenizer
from nirvana.params import Params
from nirvana.stage import run_stage


def main(params: Params, model_dir: str, corpora_dir: str, metrics_out: str) -> None:
    e = params.evaluate
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    metrics: dict = param_counts(model)
    for name in EVAL_SETS:
        stream = token_stream(pd.read_parquet(f"{corpora_dir}/{name}.parquet")["text"].tolist(), tokenizer)
        stream = stream[:e.max_tokens] if e.max_tokens else stream
        for seq_len in e.windows:
            ppl = perplexity(model, windows(stream, seq_len), e.batch_size, desc=f"{name}@{seq_len}")
            metrics[f"ppl_{name}_{seq_len}"] = round(ppl, 4)
            log.info("%s perplexity at %d-token windows: %.3f", name, seq_len, ppl)
    write_json(metrics, metrics_out)
    log.info("wrote %s", metrics_out)


if __name__ == "__main__":
    run_stage("evaluate", main)
