"""Wall-clock figures live apart from results. A stage that times something (compare, measure_gguf) writes
its results to metrics/ and its timings, with the machine that made them, to timings/: the one folder of
outputs that no rerun is expected to reproduce (`nirvana audit` skips it, every other output must match)."""

from __future__ import annotations

import math
import statistics
from typing import Any

# latencies, throughputs, the speedups measured from them, their spreads and the seconds of each round
TIMED_SUFFIXES = ("_ms", "_tokens_per_s", "_prompt_speedup", "_gen_speedup", "_spread", "_seconds")
TIMED_KEYS = ("rounds",)  # how many rounds a measurement took to reach its target spread
# each timing file and the results file it completes (`nirvana report` and the README table read both)
TIMING_FILES = {"timings/compare.json": "metrics/efficiency.json", "timings/gguf.json": "metrics/gguf.json"}


def is_timed(key: str) -> bool:
    """Latencies, throughputs, the speedups measured from them and their spreads, the rounds it took; not the
    ideal (FLOP) ratio."""
    if key in TIMED_KEYS or key.endswith(TIMED_SUFFIXES):
        return True
    return key.startswith("speedup_") and key != "speedup_ideal"


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


# Paired speedups: each round times every model once, so a round's ratio (reference seconds over model seconds)
# is drift-free; a speedup is the median of its rounds' ratios.
Rounds = dict[str, list[tuple[float, float]]]  # per model, each round's (prompt seconds, generation seconds)
MEDIAN_SE = math.sqrt(math.pi / 2)  # 1.2533: the standard error of a median per standard error of the mean


def round_ratios(rounds: Rounds, reference: str) -> dict[str, list[float]]:
    """Every model's per-round speedups over `reference`, as `<model>_prompt_speedup` and `<model>_gen_speedup`."""
    out = {}
    for name, times in rounds.items():
        if name == reference:
            continue
        for kind, i in (("prompt", 0), ("gen", 1)):
            out[f"{name}_{kind}_speedup"] = [ref[i] / own[i] for ref, own in zip(rounds[reference], times, strict=True)]
    return out


def median_spread(ratios: list[float]) -> float | None:
    """The standard error of the median of `ratios` (1.2533 x sample sd / sqrt(n)); None from one round."""
    if len(ratios) < 2:
        return None
    return MEDIAN_SE * statistics.stdev(ratios) / math.sqrt(len(ratios))


def paired_speedups(rounds: Rounds, reference: str) -> dict[str, float | int | None]:
    """Each speedup over `reference` (the median of its per-round ratios) with its spread (`..._spread`), and the
    rounds they come from."""
    out: dict[str, float | int | None] = {"rounds": len(rounds[reference])}
    for key, ratios in round_ratios(rounds, reference).items():
        spread = median_spread(ratios)
        out[key] = round(statistics.median(ratios), 4)
        out[f"{key}_spread"] = None if spread is None else round(spread, 4)
    return out


def wide_spreads(rounds: Rounds, reference: str, target: float) -> list[str]:
    """The speedups whose spread is above `target` (or unknown, from one round)."""
    spreads = {key: median_spread(ratios) for key, ratios in round_ratios(rounds, reference).items()}
    return [key for key, spread in spreads.items() if spread is None or spread > target]


def more_rounds(rounds: Rounds, reference: str, target: float, most: int) -> bool:
    """Whether to time another round: some speedup's spread is above `target` and fewer than `most` rounds ran."""
    return len(rounds[reference]) < most and bool(wide_spreads(rounds, reference, target))
