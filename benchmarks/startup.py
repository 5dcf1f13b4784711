"""Start-up of every stage: what a stage costs before it does any work. For each script in stages/, in a
fresh interpreter: the seconds to import what the script imports (`runpy.run_path`, which skips its
`if __name__ == "__main__"` block), then the seconds of `run_stage`'s own set-up (logging, params.yaml, the
CPU pin) around a body that does nothing; the median of 3 runs. It names the stages over 2 s and the
third-party imports that weigh most in each (`python -X importtime`), with the nirvana module that made them.

Run from the repository root (about 5 minutes on 2 cores; `--baseline` doubles it):
    .venv/bin/python benchmarks/startup.py
    .venv/bin/python benchmarks/startup.py --baseline /tmp/startup_old   # another checkout, timed alternately
(`git archive HEAD | tar -x -C /tmp/startup_old` makes one), so that a load on the machine weighs on both.
Writes results/startup.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import runpy
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = 3
LIMIT_S = 2.0
HEAVIEST = 3  # third-party packages named per stage
END = "-- set up --"  # what the probe prints on stderr when set up: importtime's lines after it are the exit's
# Imports that cost a second or more on 2 cores: which of them a stage has loaded once it is set up.
HEAVY = ("torch", "transformers", "transformers.modeling_utils", "pandas", "datasets", "lm_eval", "peft", "gguf")


def probe(script: str) -> dict[str, object]:
    """In this fresh interpreter: seconds to import what `script` imports, then seconds of run_stage's set-up, the
    CPU seconds of both (what a busy machine inflates least), and the heavy modules loaded by then."""
    start, cpu = time.perf_counter(), time.process_time()
    runpy.run_path(script, run_name="startup")
    imported = time.perf_counter()
    from nirvana.core.stage import run_stage  # the script imported it: no cost here

    sys.argv = [script, "unused"]
    run_stage(Path(script).stem, lambda params, path: None)
    setup, cpu = time.perf_counter() - imported, time.process_time() - cpu
    print(END, file=sys.stderr, flush=True)
    loaded = [m for m in HEAVY if m in sys.modules]
    return {"import_s": imported - start, "setup_s": setup, "cpu_s": cpu, "loaded": loaded}


def worker(tree: Path, script: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter probing `script` of the checkout `tree`, which its nirvana package comes from."""
    env = os.environ | {"PYTHONPATH": str(tree)}
    command = [sys.executable, *flags, __file__, "--probe", script]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}/{script}: {done.stderr[-2000:]}")
    return done


def report(done: subprocess.CompletedProcess[str]) -> dict:
    """What `probe` printed."""
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(tree: Path, script: str) -> dict[str, float]:
    """One run's seconds: imports, set-up, their sum, and the CPU seconds of both."""
    seconds = report(worker(tree, script))
    total = seconds["import_s"] + seconds["setup_s"]
    return {"import_s": seconds["import_s"], "setup_s": seconds["setup_s"], "total_s": total, "cpu_s": seconds["cpu_s"]}


def is_own(package: str) -> bool:
    """Python's own packages and nirvana: not what a stage could do without."""
    return package in sys.stdlib_module_names or package == "nirvana" or package.startswith("_")


def boundaries(importtime: str) -> list[dict[str, object]]:
    """Seconds per third-party package that nirvana modules (or the stage script) import themselves, including
    what it imports in turn, heaviest first, with the nirvana module that imported most of it. `-X importtime`
    prints a module after its imports, one level deeper than its importer (transformers' lazy submodules, such as
    modeling_utils, are not printed: their imports appear in their place, so they count for their package).
    Imports at exit (torch._dynamo's report imports tabulate) are left out."""
    pending: list[tuple[int, str, float]] = []
    found: dict[str, dict[str, float]] = {}
    for line in importtime.partition(END)[0].splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        _, cumulative, field = line.split("|")
        depth, name = (len(field) - len(field.lstrip()) - 1) // 2, field.strip()
        children = [entry for entry in pending if entry[0] > depth]
        pending = [entry for entry in pending if entry[0] <= depth] + [(depth, name, int(cumulative) / 1e6)]
        if name.partition(".")[0] == "nirvana":
            for _, child, seconds in children:
                by_importer = found.setdefault(child.partition(".")[0], {})
                by_importer[name] = by_importer.get(name, 0.0) + seconds
    for _, name, seconds in pending:  # imported by the script, or lazily by run_stage's set-up
        by_importer = found.setdefault(name.partition(".")[0], {})
        by_importer["the script or run_stage"] = by_importer.get("the script or run_stage", 0.0) + seconds
    rows = [
        {"package": package, "s": round(sum(by.values()), 3), "via": max(by, key=by.__getitem__)}
        for package, by in found.items()
        if not is_own(package)
    ]
    return sorted(rows, key=lambda row: -row["s"])  # type: ignore[operator]


def profile(tree: Path, script: str) -> dict[str, object]:
    """The heavy modules a start-up loads and its heaviest third-party packages, from one run under importtime."""
    done = worker(tree, script, "-X", "importtime")
    return {"loaded": report(done)["loaded"], "heaviest": boundaries(done.stderr)[:HEAVIEST]}


def measure(trees: dict[str, Path], scripts: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Median seconds per tree and stage (a stage one tree lacks is left out there); the trees take turns run by
    run, so a load on the machine hits both."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {name: {} for name in trees}
    for _ in range(RUNS):
        for script in scripts:
            for name, tree in trees.items():
                if (tree / script).is_file():
                    runs[name].setdefault(Path(script).stem, []).append(timed(tree, script))
    return {
        name: {
            stage: {key: round(statistics.median(r[key] for r in results), 3) for key in results[0]}
            for stage, results in by_stage.items()
        }
        for name, by_stage in runs.items()
    }


def cpu_model() -> str:
    """The CPU's name as /proc/cpuinfo gives it."""
    with open("/proc/cpuinfo") as info:
        return next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="another checkout to time alternately")
    parser.add_argument("--probe", metavar="SCRIPT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return
    scripts = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "stages").glob("*.py"))
    trees = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    load = os.getloadavg()[0]
    medians = measure(trees, scripts)
    before = medians.get("baseline", {})
    stages = {stage: seconds | profile(ROOT, f"stages/{stage}.py") for stage, seconds in medians["this"].items()}
    over = [stage for stage, s in stages.items() if s["total_s"] > LIMIT_S]
    out: dict[str, object] = {
        "tree": str(ROOT),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_1min": [load, os.getloadavg()[0]]},
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "runs": RUNS,
        "limit_s": LIMIT_S,
        "stages": stages,
        "over_limit": over,
    }
    if args.baseline:
        out["baseline"] = {"tree": str(args.baseline), "stages": before}
        out["speedup"] = {s: round(before[s]["total_s"] / stages[s]["total_s"], 2) for s in stages if s in before}
        out["speedup_cpu"] = {s: round(before[s]["cpu_s"] / stages[s]["cpu_s"], 2) for s in stages if s in before}
    (ROOT / "results/startup.json").write_text(json.dumps(out, indent=1) + "\n")
    for stage, s in stages.items():
        b = before.get(stage)
        was = f"   baseline {b['total_s']:5.2f} s, CPU {b['cpu_s']:5.2f} s" if b else ""
        print(f"{stage:20s} {s['total_s']:5.2f} s, CPU {s['cpu_s']:5.2f} s (set-up {s['setup_s']:4.2f} s){was}")
    for stage in over:
        top = stages[stage]["heaviest"][0]
        loads = ", ".join(stages[stage]["loaded"])
        print(f"over {LIMIT_S:g} s: {stage}: {top['package']} {top['s']:.2f} s via {top['via']}; loads {loads}")


if __name__ == "__main__":
    main()
