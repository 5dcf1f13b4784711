"""Wall-clock figures live apart from results. A stage that times something (compare, measure_gguf) writes
its results to metrics/ and its timings, with the machine that made them, to timings/: the one folder of
outputs that no rerun is expected to reproduce (`nirvana audit` skips it, every other output must match)."""

from __future__ import annotations

from typing import Any

TIMED_SUFFIXES = ("_ms", "_tokens_per_s", "_prompt_speedup", "_gen_speedup")
# each timing file and the results file it completes (`nirvana report` and the README table read both)
TIMING_FILES = {"timings/compare.json": "metrics/efficiency.json", "timings/gguf.json": "metrics/gguf.json"}


def is_timed(key: str) -> bool:
    """Latencies, throughputs and the speedups measured from them; not the ideal (FLOP) ratio."""
    return key.endswith(TIMED_SUFFIXES) or (key.startswith("speedup_") and key != "speedup_ideal")


def split(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, timings): the same nesting, each key on one side; a section with no timings stays whole."""
    results: dict[str, Any] = {}
    timed: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            kept, clocked = split(value)
            results[key] = kept
            if clocked:
                timed[key] = clocked
        elif is_timed(key):
            timed[key] = value
        else:
            results[key] = value
    return results, timed


def rejoin(results: dict[str, Any], timed: dict[str, Any]) -> dict[str, Any]:
    """The report `split` came from (and the timing file's `machine`)."""
    joined = dict(results)
    for key, value in timed.items():
        joined[key] = rejoin(joined.get(key) or {}, value) if isinstance(value, dict) else value
    return joined


def with_timings(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Metrics files by path, each results file rejoined with its timing file where both are there."""
    joined = dict(metrics)
    for timing, results in TIMING_FILES.items():
        if timing in metrics and results in metrics:
            joined[results] = rejoin(metrics[results], metrics[timing])
    return joined
