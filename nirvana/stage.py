"""The shared entry point of every stage script: validated params, logging, clean failures."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

from nirvana.errors import InputError, NativeCrash
from nirvana.io import setup_logging
from nirvana.params import ParamError, Params, load_params

# What Ctrl-C leaves: the outputs are written atomically, DVC removed this stage's old ones before it started.
INTERRUPTED = (
    "no output of this stage was written; `dvc repro` resumes (select_calibration and finetune from their "
    "checkpoints/), and `git checkout -- metrics plots` restores the committed metrics meanwhile"
)


def run_stage(name: str, body: Callable[..., None]) -> None:
    """Call `body(params, *paths)` with the paths given on the command line by dvc.yaml.

    A bad parameter, a wrong number of paths or a bad input (InputError, raised by the stage's
    checks, e.g. `nirvana.checks`) stops the stage with one line and exit code 1, before any work;
    so does a llama.cpp that died by a signal (NativeCrash, naming the file and the signal). Ctrl-C
    prints one line, not a traceback, and exits 130."""
    log = setup_logging(name)
    wanted = list(inspect.signature(body).parameters)[1:]
    paths = sys.argv[1:]
    if len(paths) != len(wanted):
        sys.exit(f"[{name}] usage: python stages/{name}.py {' '.join(w.upper() for w in wanted)}")
    try:
        params: Params = load_params()
    except ParamError as err:
        sys.exit(f"[{name}] {err}")
    log.info("starting")
    try:
        body(params, *paths)
    except (InputError, NativeCrash) as err:
        sys.exit(f"[{name}] {err}")
    except KeyboardInterrupt:
        print(f"[{name}] interrupted: {INTERRUPTED}", file=sys.stderr)
        sys.exit(130)
    log.info("done")
