"""The shared entry point of every stage script: validated params, logging, clean failures."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path

from nirvana.core.environment import kernels_in_force, pin_cpu
from nirvana.core.errors import InputError, NativeCrash
from nirvana.core.io import setup_logging
from nirvana.core.params import ParamError, Params, load_params

# What Ctrl-C leaves: the outputs are written atomically, DVC removed this stage's old ones before it started.
INTERRUPTED = (
    "no output of this stage was written; `dvc repro` resumes (select_calibration and finetune from their "
    "checkpoints/), and `git checkout -- metrics plots` restores the committed metrics meanwhile"
)

OVERSUBSCRIBED = (
    "%d jobs share %d CPUs with cpu.threads = %d each, which runs slower than one job at a time; "
    "cpu.threads: null gives each job its share (and makes the numbers depend on it)"
)


def running_jobs() -> int:
    """Jobs sharing the machine: NIRVANA_JOBS if set (`nirvana sweep --jobs N` sets it), else, in a DVC
    experiment's temporary copy (`.dvc/tmp/exps/tmp*`, as `dvc queue start -j N` runs them), the number
    of such copies there now, else 1."""
    jobs = os.environ.get("NIRVANA_JOBS")
    if jobs is not None:
        if not jobs.isdigit() or int(jobs) < 1:
            raise ParamError(f"NIRVANA_JOBS = {jobs!r} is invalid: expected the number of jobs running at once (>= 1)")
        return int(jobs)
    here = Path.cwd()
    if here.name.startswith("tmp") and here.parent.parts[-3:] == (".dvc", "tmp", "exps"):
        return max(1, sum(p.is_dir() and p.name.startswith("tmp") for p in here.parent.iterdir()))
    return 1


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_share() -> int:
    """Threads for this job: the CPUs it may run on divided among the jobs running at once (at least one),
    so that parallel experiments do not fight over cores (benchmarks/threads.py: two jobs with all threads
    each ran 3.7x slower, with their share 1.4x)."""
    return max(1, cpus() // running_jobs())


def run_stage(name: str, body: Callable[..., None]) -> None:
    """Call `body(params, *paths)` with the paths given on the command line by dvc.yaml.

    A bad parameter, a wrong number of paths or a bad input (InputError, raised by the stage's
    checks, e.g. `nirvana.pipeline.checks`) stops the stage with one line and exit code 1, before any work;
    so does a llama.cpp that died by a signal (NativeCrash, naming the file and the signal). Ctrl-C
    prints one line, not a traceback, and exits 130."""
    log = setup_logging(name)
    wanted = list(inspect.signature(body).parameters)[1:]
    paths = sys.argv[1:]
    if len(paths) != len(wanted):
        sys.exit(f"[{name}] usage: python stages/{name}.py {' '.join(w.upper() for w in wanted)}")
    try:
        params: Params = load_params()
        jobs = running_jobs()
        pin_cpu(params.cpu.kernels, params.cpu.threads or cpu_share())
    except (ParamError, InputError) as err:
        sys.exit(f"[{name}] {err}")
    cpu = kernels_in_force()
    log.info("starting (%d threads, %s kernels: %s)", cpu["threads"], cpu["kernels"], cpu["aten"])
    if params.cpu.threads and jobs > 1 and params.cpu.threads * jobs > cpus():
        log.warning(OVERSUBSCRIBED, jobs, cpus(), params.cpu.threads)
    try:
        body(params, *paths)
    except (InputError, NativeCrash) as err:
        sys.exit(f"[{name}] {err}")
    except KeyboardInterrupt:
        print(f"[{name}] interrupted: {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    log.info("done")
