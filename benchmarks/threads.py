"""Two jobs on one machine: what do they cost each other? Runs a slice of the pipeline's hot paths (the
search's pruned-model forward passes over the KL set, and fine-tuning steps with backward passes) on the
committed base model, alone and as two processes at once, with torch's default threads, with OpenMP's
passive wait policy, and with each job given its share of the CPUs (NIRVANA_JOBS=2, as a stage sets it
through nirvana.core.stage.cpu_share). Two jobs at a fair share take twice as long as one.

Run after `make run`, alone on the machine (about 4 minutes on 2 cores):
    .venv/bin/python benchmarks/threads.py
Writes results/threads.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETUPS = {  # name: (processes at once, environment)
    "alone, default threads": (1, {}),
    "alone, passive wait": (1, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "two at once, default threads": (2, {}),
    "two at once, passive wait": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "two at once, NIRVANA_JOBS=2": (2, {"NIRVANA_JOBS": "2"}),
}


def work(model_dir: str) -> dict:
    """One job's slice: seconds of 8 forward passes of 16 x 64 tokens and 4 training steps of 4 x 128."""
    import torch

    from nirvana.core.stage import cpu_share
    from nirvana.models.loading import load_model

    torch.set_num_threads(cpu_share())
    forward, train, _ = hot_paths(load_model(model_dir))
    return {"threads": torch.get_num_threads(), "forward_s": forward, "train_s": train}


def hot_paths(model: Any) -> tuple[float, float, Any]:
    """Seconds of 8 forward passes of 16 x 64 tokens and of 4 training steps of 4 x 128 (the model's weights
    unchanged: lr 0), and the first forward's logits."""
    import torch

    ids = torch.randint(0, model.config.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
        for _ in range(7):
            model(input_ids=ids, use_cache=False)
    forward = time.perf_counter() - start
    batch = ids.reshape(4, 256)[:, :128]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.train()
    start = time.perf_counter()
    for _ in range(4):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return forward, time.perf_counter() - start, logits


def measure(processes: int, env: dict[str, str], model_dir: str) -> dict:
    """Start `processes` workers at once; each reports its own seconds, and the wall time covers all."""
    start = time.perf_counter()
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", model_dir], env=os.environ | env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    reports = [json.loads(w.communicate()[0].strip().splitlines()[-1]) for w in workers]
    return {"wall_s": time.perf_counter() - start, "jobs": reports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="outputs/base_model")
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(args.worker)))
        return
    results = {name: measure(n, env, args.model) for name, (n, env) in SETUPS.items()}
    alone = results["alone, default threads"]["jobs"][0]
    for r in results.values():  # each job's slice against the same slice run alone
        r["slowdown"] = [
            round((j["forward_s"] + j["train_s"]) / (alone["forward_s"] + alone["train_s"]), 2) for j in r["jobs"]
        ]
    out = {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "setups": results}
    Path("results/threads.json").write_text(json.dumps(out, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:32s} wall {r['wall_s']:6.1f} s   slowdown per job {r['slowdown']}")


if __name__ == "__main__":
    main()
