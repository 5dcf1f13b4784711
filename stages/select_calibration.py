"""Stage select_calibration: a seeded draw of calibration windows from the pool."""

import pandas as pd

from nirvana.data import draw_windows, token_stream
from nirvana.io import log, write_parquet
from nirvana.modeling import load_tokenizer
from nirvana.params import Params
from nirvana.stage import run_stage


def main(params: Params, model_dir: str, pool: str, out: str) -> None:
    c = params.calibration
    stream = token_stream(pd.read_parquet(pool)["text"].tolist(), load_tokenizer(model_dir))
    windows = draw_windows(stream, c.num_samples, c.seq_len, c.seed)
    write_parquet(pd.DataFrame({"input_ids": windows.tolist()}), out)
    log.info("wrote %s: %d windows x %d tokens (seed %d, pool %d tokens)",
             out, c.num_samples, c.seq_len, c.seed, len(stream))


if __name__ == "__main__":
    run_stage("select_calibration", main)
