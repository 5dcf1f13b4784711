"""Run GGUF files in a real llama.cpp (llama-cpp-python): perplexity on token windows, and prompt and
generation throughput of several models timed alternately, so that drift hits all of them alike."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

try:
    import llama_cpp
except ImportError as error:  # an extra: pip builds it from the sdist
    raise ImportError("llama.cpp is not installed: pip install -e '.[deploy]' (make run does)") from error


def open_model(
    path: Path, n_ctx: int, threads: int, batch: int, logits_all: bool = False, flash: bool = False
) -> llama_cpp.Llama:
    """A llama.cpp context on `threads` threads with the default f16 KV cache; last-token logits only
    unless `logits_all` (perplexity). Flash attention is off unless `flash`: off, llama.cpp pads every
    layer's V cache to the widest one, but prompts of pruned models ran faster (README)."""
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


def perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    """llama.cpp perplexity of a GGUF over `windows` (one row a window), as `evaluate` counts it:
    every next-token prediction inside a window."""
    llm = open_model(path, windows.shape[1], threads, windows.shape[1], logits_all=True)
    try:
        total = sum(window_nll(llm, row.tolist()) for row in windows)
    finally:
        llm.close()
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


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
) -> dict[str, dict]:
    """Median prompt and generation throughput of every model: `warmup` rounds, then `repeats` rounds that
    run every model once, in reversed order every other round."""
    n_ctx, batch = len(prompt) + new_tokens, len(prompt)
    llms = {name: open_model(path, n_ctx, threads, batch, flash=flash) for name, path in paths.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in llms}
    try:
        for _ in range(warmup):
            for llm in llms.values():
                run_once(llm, prompt, new_tokens)
        for round_ in range(repeats):
            for name in list(llms)[:: -1 if round_ % 2 else 1]:
                times[name].append(run_once(llms[name], prompt, new_tokens))
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
