"""Run GGUF files in a real llama.cpp (llama-cpp-python): perplexity on token windows, and prompt and
generation throughput of several models timed alternately, so that drift hits all of them alike, for as many
rounds as a stop rule asks (nirvana.evaluation.timings.more_rounds). `isolated` runs such work in a child process, so
that llama.cpp dying by a signal becomes one error naming the file."""

from __future__ import annotations

import multiprocessing
import signal
import statistics
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

try:
    import llama_cpp
except ImportError as error:  # an extra: pip builds it from the sdist
    raise ImportError("llama.cpp is not installed: pip install -e '.[deploy]' (make run does)") from error

from nirvana.core.errors import NativeCrash

T = TypeVar("T")
# per model, each round's (prompt seconds, generation seconds): what a stop rule such as
# evaluation.timings.more_rounds reads (not imported here: perplexity does not depend on the timing code)
Rounds = dict[str, list[tuple[float, float]]]
_parent: Connection | None = None  # in a child started by `isolated`: where it says which file it runs


def announce(path: str | Path) -> None:
    """Tell the parent of an `isolated` child which file llama.cpp is about to run (a no-op elsewhere)."""
    if _parent is not None:
        _parent.send(("file", str(path)))


def _child(parent: Connection, fn: Callable[..., Any], args: tuple) -> None:
    global _parent
    _parent = parent
    try:
        parent.send(("done", fn(*args)))
    except Exception as err:
        traceback.print_exc()
        parent.send(("error", f"{type(err).__name__}: {err}"))
    parent.close()


def crash_message(exitcode: int | None, path: str | None) -> str:
    """`llama.cpp died of SIGILL (Illegal instruction) while running FILE`, and what to do about it."""
    running = f"while running {path or 'no file yet'}"
    if not exitcode or exitcode > 0:
        return f"llama.cpp died of exit code {exitcode or 0} {running}"
    number = -exitcode  # a child killed by signal N exits with -N, and N is always a valid signal
    return (
        f"llama.cpp died of {signal.Signals(number).name} ({signal.strsignal(number)}) {running}; a llama.cpp "
        "built for another CPU dies so (SIGILL, or SIGSEGV from AMX on a virtual machine): `make install` builds "
        "the portable one (docs/deployment.md)"
    )


def isolated(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a fresh (spawned) child process: llama.cpp's native code can die by a signal, e.g. an
    illegal instruction on a CPU its build does not fit, which would otherwise take the stage down with only
    DVC's `exited with -4`. Raises NativeCrash naming the signal and the last file `announce`d."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, fn, args), daemon=True)
    child.start()
    send.close()
    path, outcome = None, None
    try:
        while outcome is None:
            kind, value = receive.recv()
            if kind == "file":
                path = value
            else:
                outcome = (kind, value)
    except EOFError:  # the child died without a word
        pass
    finally:
        child.join()
    if outcome is None:
        raise NativeCrash(crash_message(child.exitcode, path))
    if outcome[0] == "error":
        raise RuntimeError(f"llama.cpp run on {path or 'no file yet'} failed in its child process: {outcome[1]}")
    return outcome[1]


def open_model(
    path: Path, n_ctx: int, threads: int, batch: int, logits_all: bool = False, flash: bool = False
) -> llama_cpp.Llama:
    """A llama.cpp context on `threads` threads with the default f16 KV cache; last-token logits only
    unless `logits_all` (perplexity). Flash attention is off unless `flash`: off, llama.cpp pads every
    layer's V cache to the widest one, but prompts of pruned models ran faster (docs/deployment.md)."""
    announce(path)
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=batch,
        n_ubatch=batch,
        logits_all=logits_all,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash,
        verbose=False,
    )


def window_nll(llm: llama_cpp.Llama, window: list[int]) -> float:
    """Summed next-token NLL over one window, every position's logits from one llama.cpp batch."""
    llm.reset()
    llm.eval(window)
    logits = torch.from_numpy(llm.scores[: len(window) - 1])
    return torch.nn.functional.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()


def perplexity(path: Path, windows: torch.Tensor | list[list[int]], threads: int) -> float:
    """llama.cpp perplexity of a GGUF over `windows` (one row a window), as `evaluate` counts it:
    every next-token prediction inside a window."""
    rows = windows.tolist() if isinstance(windows, torch.Tensor) else windows
    llm = open_model(path, len(rows[0]), threads, len(rows[0]), logits_all=True)
    try:
        total = sum(window_nll(llm, row) for row in rows)
    finally:
        llm.close()
    return float(np.exp(total / (len(rows) * (len(rows[0]) - 1))))


def run_once(llm: llama_cpp.Llama, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Seconds for the prompt (one batch, empty cache), then for `new_tokens` greedy tokens one at a time."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - start
    vocab = llm.n_vocab()
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        llm.eval([int(logits.argmax())])
    return prompt_s, time.perf_counter() - start


def speed(
    paths: dict[str, Path],
    prompt: list[int],
    new_tokens: int,
    threads: int,
    warmup: int,
    repeats: int,
    flash: bool = False,
    more: Callable[[Rounds], bool] | None = None,
) -> dict[str, dict]:
    """Median prompt and generation throughput of every model: `warmup` rounds, then `repeats` rounds that
    run every model once, in reversed order every other round, then one round at a time while `more` (given
    the seconds so far) asks for it."""
    n_ctx, batch = len(prompt) + new_tokens, len(prompt)
    llms = {name: open_model(path, n_ctx, threads, batch, flash=flash) for name, path in paths.items()}
    times: Rounds = {name: [] for name in llms}
    try:
        for _ in range(warmup):
            for name, llm in llms.items():
                announce(paths[name])
                run_once(llm, prompt, new_tokens)
        round_ = 0
        while round_ < repeats or (more is not None and more(times)):
            for name in list(llms)[:: -1 if round_ % 2 else 1]:
                announce(paths[name])
                times[name].append(run_once(llms[name], prompt, new_tokens))
            round_ += 1
    finally:
        for llm in llms.values():
            llm.close()
    out = {}
    for name, pairs in times.items():
        prompt_s, gen_s = statistics.median(p for p, _ in pairs), statistics.median(g for _, g in pairs)
        out[name] = {
            "prompt_tokens_per_s": round(len(prompt) / prompt_s, 1),
            "gen_tokens_per_s": round(new_tokens / gen_s, 1),
            "prompt_s": [round(p, 5) for p, _ in pairs],
            "gen_s": [round(g, 5) for _, g in pairs],
        }
    return out


def perplexities(files: dict[str, Path], windows: list[list[int]], threads: int) -> dict[str, float]:
    """Perplexity of each GGUF (`files[type]`) over `windows`. Run it `isolated`."""
    return {type: perplexity(path, windows, threads) for type, path in files.items()}


def timed(
    files: dict[str, dict[str, Path]],
    prompt: list[int],
    new_tokens: int,
    threads: int,
    warmup: int,
    repeats: int,
    more: Callable[[Rounds], bool],
) -> dict[str, dict[str, dict]]:
    """Per GGUF type and model (`files[type][model]`), prompt and generation throughput and each round's
    seconds, the models of one type timed alternately (`speed`). Run it `isolated`."""
    return {
        type: speed(paths, prompt, new_tokens, threads, warmup, repeats, more=more) for type, paths in files.items()
    }
