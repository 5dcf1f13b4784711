"""Seconds per judged plan, the code of HEAD against this tree's, side by side: every plan the committed run
judged (outputs/calibration_candidates.parquet: one per candidate calibration set, from the saliency of its
windows; outputs/plan_candidates.parquet: one per gamma, from outputs/saliency.parquet) is pruned and
its held-out KL measured by both, alternately, each in its own process (`git archive HEAD` in a temporary
folder, and this tree) holding its own dense reference; pinned kernels and threads as params.yaml says. Each
plan's digest must be the recorded one; then the KL of both against the recorded KL, and the choices (the
calibration winner, the gamma winner) from each side's KLs. Each plan is timed as `select_plan` runs it (copy,
plan, surgery, KL); the layers a stage's plans share with the dense model are recorded by its first plan
only, so the new side forgets them where the pipeline's next stage starts.

Run after `make run` (it reads outputs/ and params.yaml; about 15 minutes on 2 idle cores, of which 2 for
the saliency of the sets that lost, which `--scores DIR` keeps for a rerun):
    .venv/bin/python benchmarks/judging.py
Writes results/judging.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "outputs/base_model"
MARK = "judging> "  # prefixes the workers' answers: libraries may print to stdout too


def work(tree: str) -> None:
    """A worker on the code of `tree`: the dense reference (timed), then one judged plan per line of stdin
    ({stage, scores, method, gamma}), answered with its KL, digest, seconds and the process's peak memory."""
    import nirvana
    from nirvana.core.data import read_texts
    from nirvana.core.environment import pin_cpu
    from nirvana.core.params import load_params
    from nirvana.method.calibration import kl_set
    from nirvana.method.selection import by_method
    from nirvana.models.loading import load_model, load_tokenizer

    try:
        from nirvana.method.kl import HeldOut
        from nirvana.method.selection import select_plan
    except ImportError:  # a HEAD from before nirvana.method.kl: the same code under its old names
        from nirvana.method.selection import HeldOut
        from nirvana.method.selection import choose as select_plan

    assert Path(nirvana.__file__).resolve().is_relative_to(Path(tree).resolve()), nirvana.__file__
    params = load_params(Path(tree) / "params.yaml")  # the params its code knows
    pin_cpu(params.cpu.kernels, params.cpu.threads or 2)
    model = load_model(MODEL, params.model, granularity=params.attention.granularity)
    c = params.calibration
    windows = kl_set(c, load_tokenizer(MODEL, params.model), read_texts(c.path))
    start = time.perf_counter()
    held_out = HeldOut.of(model, windows, c.kl_batch_size)
    print(MARK + json.dumps({"reference_s": time.perf_counter() - start}), flush=True)
    stage = None
    for line in sys.stdin:
        job = json.loads(line)
        if job["stage"] != stage:  # a new stage process: nothing recorded yet (the old code records nothing)
            getattr(held_out, "prefixes", {}).clear()
            stage = job["stage"]
        run = dataclasses.replace(params, method=job["method"], gamma=job["gamma"])
        scores = by_method(pd.read_parquet(job["scores"]))
        start = time.perf_counter()
        _, table = select_plan(model, scores, run, params.sparsity, None, held_out)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        row = {"kl": float(table["kl"].iloc[0]), "digest": table["plan_digest"].iloc[0], "seconds": seconds}
        print(MARK + json.dumps(row | {"peak_rss_gib": peak}), flush=True)


class Worker:
    """A worker process on the code of `tree`, answering one JSON line per request."""

    def __init__(self, tree: Path) -> None:
        env = os.environ | {"PYTHONPATH": str(tree)}
        command = [sys.executable, __file__, "--worker", str(tree)]
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def answer(self) -> dict:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line.removeprefix(MARK))
        raise RuntimeError(f"worker exited with {self.process.wait()}")

    def ask(self, job: dict) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait()


def candidate_scores(folder: Path) -> list[dict]:
    """One job per candidate of the calibration search. The winner's windows are the ones compute_saliency
    scored (outputs/saliency.parquet); the others' saliency is computed again as the search did (pinned
    kernels), or read from `folder` where an earlier run left it."""
    from nirvana.core.data import read_texts, read_windows
    from nirvana.core.environment import pin_cpu
    from nirvana.core.params import load_params
    from nirvana.method.calibration import candidate_pool
    from nirvana.method.criteria import CRITERIA
    from nirvana.models.loading import load_model, load_tokenizer

    params = load_params()
    pin_cpu(params.cpu.kernels, params.cpu.threads or 2)
    c, selected = params.calibration, read_windows("outputs/calibration.parquet")
    pool, _ = candidate_pool(
        c, load_tokenizer(MODEL, params.model), read_texts(c.path), overlap_ngram=params.data.overlap_ngram
    )
    jobs, model = [], None
    for row in pd.read_parquet("outputs/calibration_candidates.parquet").itertuples():
        windows, path = pool[torch.tensor(row.windows)], folder / f"saliency-{row.candidate}.parquet"
        if torch.equal(windows, selected):
            path = Path("outputs/saliency.parquet")
        elif not path.exists():
            model = model or load_model(MODEL, params.model, granularity=params.attention.granularity)
            CRITERIA[row.method](model, windows, params.saliency.batch_size).assign(method=row.method).to_parquet(path)
        job = {"stage": "select_calibration", "scores": str(path), "method": row.method, "gamma": row.gamma}
        jobs.append(job | {"digest": row.plan_digest, "recorded_kl": row.kl, "name": f"candidate {row.candidate}"})
    return jobs


def gamma_jobs() -> list[dict]:
    """One job per gamma allocate_sparsity recorded, from compute_saliency's table."""
    return [
        {
            "stage": "allocate_sparsity",
            "scores": "outputs/saliency.parquet",
            "method": row.method,
            "gamma": row.gamma,
            "digest": row.plan_digest,
            "recorded_kl": row.kl,
            "name": f"gamma {row.gamma:g}",
        }
        for row in pd.read_parquet("outputs/plan_candidates.parquet").itertuples()
    ]


def head_tree(folder: Path) -> Path:
    """The nirvana package and params.yaml of the committed code (HEAD), extracted into `folder`."""
    command = ["git", "archive", "HEAD", "nirvana", "params.yaml"]
    archive = subprocess.run(command, cwd=ROOT, capture_output=True, check=True)
    (folder / "head.tar").write_bytes(archive.stdout)
    with tarfile.open(folder / "head.tar") as tar:
        tar.extractall(folder / "head", filter="data")
    return folder / "head"


def winner(kls: list[float], names: list[str]) -> str:
    """The choice the pipeline makes: the lowest KL, ties to the first."""
    return names[min(range(len(kls)), key=lambda i: (kls[i], i))]


def relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def summary(jobs: list[dict], reference_s: dict[str, float]) -> dict:
    """Seconds per plan on each side, KLs against the recorded ones, and the choices each side makes."""
    from nirvana.core.environment import cpu_model
    from nirvana.core.params import load_params

    cpu = load_params().cpu
    out: dict = {"cpu": cpu_model(), "kernels": cpu.kernels, "threads": cpu.threads or 2, "plans": len(jobs)}
    out["reference_s"] = reference_s
    for side in ("old", "new"):
        seconds = [j[side]["seconds"] for j in jobs]
        out[f"{side}_s_per_plan"] = {"mean": statistics.mean(seconds), "median": statistics.median(seconds)}
    out["new_over_old"] = out["new_s_per_plan"]["mean"] / out["old_s_per_plan"]["mean"]
    recorded = [j["recorded_kl"] for j in jobs]
    for side in ("old", "new"):
        out[f"max_relative_kl_difference_{side}_vs_recorded"] = relative([j[side]["kl"] for j in jobs], recorded)
    out["max_relative_kl_difference_new_vs_old"] = relative(
        [j["new"]["kl"] for j in jobs], [j["old"]["kl"] for j in jobs]
    )
    for stage in ("select_calibration", "allocate_sparsity"):
        block = [j for j in jobs if j["stage"] == stage]
        names = [j["name"] for j in block]
        out[f"{stage}_choice"] = {
            side: winner([j[key] if key == "recorded_kl" else j[key]["kl"] for j in block], names)
            for side, key in (("recorded", "recorded_kl"), ("old", "old"), ("new", "new"))
        }
    out["peak_rss_gib"] = {side: max(j[side]["peak_rss_gib"] for j in jobs) for side in ("old", "new")}
    out["load_average"] = os.getloadavg()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scores", type=Path, help="keep the candidates' saliency here, to reuse on a rerun")
    args = parser.parse_args()
    if args.worker:
        work(args.worker)
        return
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="judging-") as tmp:
        folder = Path(tmp)
        if args.scores:
            args.scores.mkdir(parents=True, exist_ok=True)
        jobs = candidate_scores(args.scores or folder) + gamma_jobs()
        workers, reference_s = {}, {}
        for side, tree in (("old", head_tree(folder)), ("new", ROOT)):  # one at a time: each times its reference
            workers[side] = Worker(tree)
            reference_s[side] = workers[side].answer()["reference_s"]
        for i, job in enumerate(jobs):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")  # alternated: neither always goes first
            for side in order:
                job[side] = workers[side].ask(job)
                assert job[side]["digest"] == job["digest"], f"{job['name']}: {side} made another plan"
            print(job["name"], {side: round(job[side]["seconds"], 1) for side in order}, flush=True)
        for worker in workers.values():
            worker.close()
    out = summary(jobs, reference_s) | {"jobs": jobs}
    Path("results/judging.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "jobs"}, indent=1))


if __name__ == "__main__":
    main()
