"""Zero-shot accuracy of the dense base model on full task sets, to compare with published
figures (the pipeline's `evaluate.limit` keeps CPU runs short). Run after `make run`:
    .venv/bin/python benchmarks/zeroshot_full.py piqa winogrande
Writes results/zeroshot_full.json."""

import json
import sys
import time
from pathlib import Path

from nirvana.evaluation.zeroshot import zero_shot
from nirvana.models.loading import load_model, load_tokenizer


def main(tasks: list[str]) -> None:
    model, tokenizer = load_model("outputs/base_model"), load_tokenizer("outputs/base_model")
    start = time.perf_counter()
    accuracies, info = zero_shot(model, tokenizer, tasks, limit=None, batch_size=8)
    result = {
        "model": "outputs/base_model",
        "accuracies": accuracies,
        "info": info,
        "seconds": round(time.perf_counter() - start, 1),
    }
    Path("results").mkdir(exist_ok=True)
    Path("results/zeroshot_full.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(accuracies, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or ["piqa", "winogrande"])
