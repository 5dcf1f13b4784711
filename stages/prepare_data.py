"""Stage prepare_data: calibration pool and held-out perplexity sets as parquet tables of text."""

from pathlib import Path

from nirvana.core.data import build_corpora
from nirvana.core.io import atomic_path, log
from nirvana.core.params import Params
from nirvana.core.stage import run_stage


def main(params: Params, out_dir: str) -> None:
    corpora = build_corpora(params.data.overlap_ngram)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, table in corpora.items():
            table.to_parquet(Path(tmp) / f"{name}.parquet", index=False)
            log.info("%s: %d passages, %d characters", name, len(table), table["text"].str.len().sum())
    log.info("wrote %s", out_dir)


if __name__ == "__main__":
    run_stage("prepare_data", main)
