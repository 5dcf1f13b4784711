"""What the portable CPU kernels cost: the pipeline's hot paths on the committed base model (the search's
forward passes over the KL set, and fine-tuning steps with backward passes), with `cpu.kernels` portable and
native, each in a fresh process (the code paths are fixed when torch first computes), alternated over
several rounds so that both see the same machine; 2 threads each, as a stage runs them. Also whether the
two give the same bits (they should not, on a CPU whose native level is above AVX2).

Run after `make run`, alone on the machine (about 3 minutes on 2 cores):
    .venv/bin/python benchmarks/cpu_kernels.py --rounds 3
Writes results/cpu_kernels.json."""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

from threads import hot_paths  # benchmarks/threads.py: the same slice of the pipeline's hot paths


def work(model_dir: str, kernels: str) -> dict:
    """One process: the seconds of `hot_paths`, the hash of its first logits, and the code path torch ran."""
    from nirvana.core.environment import kernels_in_force, pin_cpu
    from nirvana.models.loading import load_model

    pin_cpu(kernels, 2)
    forward, train, logits = hot_paths(load_model(model_dir))
    return {
        "cpu": kernels_in_force(),
        "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:16],
        "forward_s": round(forward, 3),
        "train_s": round(train, 3),
    }


def run(model_dir: str, kernels: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--worker", model_dir, kernels], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="outputs/base_model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "KERNELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(*args.worker)))
        return
    from nirvana.core.environment import cpu_model

    runs: dict[str, list[dict]] = {"portable": [], "native": []}
    for _ in range(args.rounds):
        for kernels in runs:
            runs[kernels].append(run(args.model, kernels))
    median = {k: {s: statistics.median(r[s] for r in rs) for s in ("forward_s", "train_s")} for k, rs in runs.items()}
    ratio = {s: round(median["portable"][s] / median["native"][s], 2) for s in ("forward_s", "train_s")}
    same_bits = len({r["logits_sha256"] for rs in runs.values() for r in rs}) == 1
    out = {"cpu": cpu_model(), "rounds": args.rounds, "median": median, "portable_over_native": ratio}
    out |= {"same_bits": same_bits, "runs": runs}
    Path("results/cpu_kernels.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("cpu", "median", "portable_over_native", "same_bits")}, indent=1))


if __name__ == "__main__":
    main()
