"""What the portable llama.cpp build costs against a native one: the pipeline's dense and pruned GGUF files
(outputs/gguf, after `make run`) timed in each build, builds alternating round by round so that drift hits
both alike. Each round is a fresh process per build, so a build that dies (a native build's AMX kernels on a
virtual machine that cannot run them) is recorded with its signal instead of ending the benchmark.

Build the native wheel beside the portable one the Makefile installs, then point at its folder:
    CMAKE_ARGS=-DLLAVA_BUILD=OFF .venv/bin/pip wheel --no-deps --no-cache-dir -w /tmp/native llama-cpp-python==0.3.36
    .venv/bin/pip install --no-deps --target /tmp/site-native /tmp/native/llama_cpp_python-*.whl
    .venv/bin/python benchmarks/llamacpp_build.py --build native=/tmp/site-native --rounds 3
Writes results/llamacpp_build.json. "portable" is the llama.cpp installed in the running environment."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path

FILES = ["dense-f16", "pruned-f16", "dense-q8_0", "pruned-q8_0"]
PROMPT, NEW_TOKENS, THREADS = 128, 64, 2


def worker(gguf_dir: str, prompt: list[int]) -> None:
    """One round in this process's llama.cpp, one JSON line per measurement as it finishes: per file, 64 tokens
    generated after a one-token prompt (batch-of-one kernels only), then a 128-token prompt and 64 tokens."""
    import llama_cpp

    from nirvana.deploy.llamacpp import speed

    print(json.dumps({"system_info": llama_cpp.llama_print_system_info().decode().strip()}), flush=True)
    for name in FILES:
        path = Path(gguf_dir, f"{name}.gguf")
        single = speed({name: path}, prompt[:1], NEW_TOKENS, THREADS, warmup=1, repeats=1)[name]
        print(json.dumps({"file": name, "gen_after_1_token_per_s": single["gen_tokens_per_s"]}), flush=True)
        batched = speed({name: path}, prompt, NEW_TOKENS, THREADS, warmup=1, repeats=1)[name]
        figures = {k: batched[k] for k in ("prompt_tokens_per_s", "gen_tokens_per_s")}
        print(json.dumps({"file": name, **figures}), flush=True)


def wiki_prompt() -> list[int]:
    """The first 128 tokens of evaluate's wiki windows, the prompt measure_gguf times."""
    from nirvana.evaluation.perplexity import held_out
    from nirvana.models.loading import load_tokenizer

    wiki = held_out("outputs/corpora", "wiki", load_tokenizer("outputs/base_model"), 8192, 128)
    return wiki.flatten()[:PROMPT].tolist()


def one_round(site: str | None, gguf_dir: str, prompt: list[int]) -> dict:
    """A worker process on `site`'s llama.cpp (None: the installed one): what it measured, and the signal that
    ended it early with the measurement it was in (the next one after its last line)."""
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--worker", gguf_dir, json.dumps(prompt)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    out: dict = {}
    for line in done.stdout.splitlines():
        row = json.loads(line)
        if "file" in row:
            out.setdefault(row.pop("file"), {}).update(row)
        else:
            out |= row
    if done.returncode:
        how = signal.Signals(-done.returncode).name if done.returncode < 0 else f"exit {done.returncode}"
        last = [name for name in FILES if name in out][-1:] or ["start"]  # files run in FILES order
        out["died"] = f"{how} after {last[0]}: {sorted(out.get(last[0], {}))}"
    return out


def summarise(rounds: list[dict]) -> dict:
    """Per file and figure, the median over the rounds that measured it; deaths listed as they came."""
    out: dict = {"rounds": len(rounds), "deaths": [r["died"] for r in rounds if "died" in r]}
    out["system_info"] = next((r["system_info"] for r in rounds if "system_info" in r), "")
    for name in FILES:
        figures = {k for r in rounds for k in r.get(name, {})}
        out[name] = {k: statistics.median(r[name][k] for r in rounds if k in r.get(name, {})) for k in sorted(figures)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", default=[], help="NAME=FOLDER holding a llama_cpp package")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gguf", default="outputs/gguf")
    parser.add_argument("--out", default="results/llamacpp_build.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], json.loads(args.worker[1]))
    builds: dict[str, str | None] = {"portable": None} | dict(b.split("=", 1) for b in args.build)
    prompt = wiki_prompt()
    rounds: dict[str, list[dict]] = {name: [] for name in builds}
    for index in range(args.rounds):
        for name in list(builds)[:: -1 if index % 2 else 1]:
            rounds[name].append(one_round(builds[name], args.gguf, prompt))
            print(name, index, rounds[name][-1].get("died", "ok"), flush=True)
    report = {
        "command": " ".join(["benchmarks/llamacpp_build.py", *sys.argv[1:]]),
        "machine": platform.processor() or platform.machine(),
        "threads": THREADS,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW_TOKENS,
        "builds": {name: summarise(r) for name, r in rounds.items()},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["builds"], indent=2))


if __name__ == "__main__":
    main()
