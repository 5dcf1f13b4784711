"""`nirvana sweep`: one DVC experiment per (method, sparsity), each stopping at evaluate@pruned."""

from __future__ import annotations

import subprocess
import sys

from nirvana.params import METHODS

# The comparison is without fine-tuning, and speed is `compare`'s job; evaluate@dense is a target so
# that sweep settings such as evaluate.limit measure the dense model the same way (once: DVC then
# finds it unchanged for the other runs).
TARGETS = ["evaluate@dense", "evaluate@pruned"]


def sweep_commands(methods: list[str], sparsities: list[float], settings: list[str], queue: bool) -> list[list[str]]:
    """The `dvc exp run` command lines, checked before any of them runs."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"sweep: unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise ValueError(f"sweep: sparsity {bad[0]} is invalid; expected 0 <= sparsity < 1")
    malformed = [s for s in settings if "=" not in s]
    if malformed:
        raise ValueError(f"sweep: --set {malformed[0]!r} is not KEY=VALUE")
    dvc = [sys.executable, "-m", "dvc", "exp", "run", *(["--queue"] if queue else []), *TARGETS]
    extra = [arg for setting in settings for arg in ("-S", setting)]
    return [
        [*dvc, "-S", f"method={method}", "-S", f"sparsity={sparsity}", *extra]
        for method in methods
        for sparsity in sparsities
    ]


def sweep(methods: list[str], sparsities: list[float], settings: list[str], queue: bool) -> None:
    """Run (or queue, for `dvc queue start -j N`) every experiment, one after another."""
    for command in sweep_commands(methods, sparsities, settings, queue):
        print("+", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
