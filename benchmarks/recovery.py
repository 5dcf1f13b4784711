"""Recovery recipes side by side on this run's pruned model: wiki perplexity during and after fine-tuning with
each recipe (loss, adapter, learning rate), the share of the dense-to-pruned log-perplexity gap it closes, the
time per optimiser step and the peak memory. Each recipe trains in a child process of its own (peak memory is
the child's), through the pipeline's own `nirvana.recovery.finetune.train`.

Run after `make run` (reads outputs/pruned_model, outputs/base_model and outputs/corpora):
    .venv/bin/python benchmarks/recovery.py --steps 40 --eval-at 0 20 40 \\
        --recipe lm:lora:1e-4 --recipe lm:lora:1e-3 --recipe kd:lora:1e-3 --recipe kd:full:5e-5
Writes results/recovery.json (one entry per recipe, appended under --name)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import resource
import time
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from nirvana.core.params import load_params
from nirvana.evaluation.perplexity import held_out, perplexity
from nirvana.models.loading import load_model, load_tokenizer
from nirvana.recovery.finetune import build_examples, load_rows, load_teacher, train

PRUNED, DENSE, CORPORA = "outputs/pruned_model", "outputs/base_model", "outputs/corpora"


class Curve(TrainerCallback):
    """Wiki perplexity at the listed steps, and the wall time of every optimiser step (evaluations excluded)."""

    def __init__(self, model, held_out, eval_at: list[int], batch_size: int) -> None:  # type: ignore[no-untyped-def]
        self.model, self.held_out, self.eval_at, self.batch_size = model, held_out, eval_at, batch_size
        self.ppl: dict[str, float] = {}  # by step, as a string: the JSON's keys
        self.step_s: list[float] = []
        self.last = time.perf_counter()

    def measure(self, step: int) -> None:
        was_training = self.model.training
        self.model.eval()
        self.ppl[str(step)] = round(perplexity(self.model, self.held_out, self.batch_size, desc=f"ppl@{step}"), 3)
        self.model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.model = model  # the peft-wrapped model for LoRA: its forward includes the adapters
        if 0 in self.eval_at:
            self.measure(0)
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.step_s.append(time.perf_counter() - self.last)
        if state.global_step in self.eval_at:
            self.measure(state.global_step)
        self.last = time.perf_counter()


def run_recipe(recipe: str, steps: int, eval_at: list[int], out: multiprocessing.Queue) -> None:
    """Train one recipe `loss:adapter:lr` in this (child) process and put its figures on `out`."""
    loss, adapter, lr = recipe.split(":")
    params = load_params()
    f = dataclasses.replace(params.finetune, loss=loss, adapter=adapter, lr=float(lr), steps=steps, save_steps=10**6)
    tokenizer = load_tokenizer(PRUNED)
    model = load_model(PRUNED, params.model, on="cpu")
    examples = build_examples(load_rows(f.path), tokenizer, f.seq_len)
    teacher = load_teacher(DENSE, params.model) if loss != "lm" else None
    wiki = held_out(CORPORA, "wiki", tokenizer, params.evaluate.max_tokens, 128)  # as evaluate scores it
    curve = Curve(model, wiki, eval_at, params.evaluate.batch_size)
    _, summary = train(
        model, tokenizer, examples, f, Path(f"/tmp/recovery-{recipe.replace(':', '-')}"), [curve], teacher
    )
    out.put(
        {
            "recipe": recipe,
            "loss": loss,
            "adapter": adapter,
            "lr": float(lr),
            "steps": steps,
            "ppl_wiki_128": curve.ppl,
            "step_s_median": round(sorted(curve.step_s)[len(curve.step_s) // 2], 3),
            "train_s": round(sum(curve.step_s), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "trainable_params": summary["trainable_params"],
            "tokens_seen": summary["tokens_seen"],
            "loss_first": summary["loss_first"],
            "loss_last": summary["loss_last"],
        }
    )


def in_child(target: Callable[..., None], *args: object) -> dict:
    """`target(*args, queue)` in a spawned process, so each run's peak memory and threads are its own; what it puts."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=target, args=(*args, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def gap_closed(dense: float, pruned: float, recovered: float) -> float:
    """The share of the dense-to-pruned log-perplexity gap that recovery closes."""
    return round((math.log(pruned) - math.log(recovered)) / (math.log(pruned) - math.log(dense)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", required=True, help="loss:adapter:lr, e.g. kd:lora:1e-3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-at", type=int, nargs="+", default=[0, 40])
    parser.add_argument("--name", default="sparsity-0.2", help="the key the figures go under in the JSON")
    parser.add_argument("--out", default="results/recovery.json")
    parser.add_argument("--csv", help="also write this entry's curves as CSV (step, one column per recipe)")
    args = parser.parse_args()
    params = load_params()
    tokenizer = load_tokenizer(DENSE)
    wiki = held_out(CORPORA, "wiki", tokenizer, params.evaluate.max_tokens, 128)
    dense = perplexity(load_model(DENSE, params.model), wiki, params.evaluate.batch_size, desc="dense")
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    entry = results.setdefault(args.name, {"ppl_wiki_128_dense": round(dense, 3), "recipes": {}})
    for recipe in args.recipe:
        figures = in_child(run_recipe, recipe, args.steps, sorted({0, *args.eval_at, args.steps}))
        pruned, last = figures["ppl_wiki_128"]["0"], figures["ppl_wiki_128"][str(args.steps)]
        figures["gap_closed"] = gap_closed(dense, pruned, last)
        entry["recipes"][f"{recipe}@{args.steps}"] = figures
        print(json.dumps(figures), flush=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
    if args.csv:
        write_curves(entry["recipes"], Path(args.csv))


def write_curves(recipes: dict, path: Path) -> None:
    """Wiki perplexity by step, a column per recipe (empty where a recipe was not evaluated at that step)."""
    steps = sorted({int(step) for figures in recipes.values() for step in figures["ppl_wiki_128"]})
    lines = [",".join(["step", *recipes])]
    for step in steps:
        cells = [str(figures["ppl_wiki_128"].get(str(step), "")) for figures in recipes.values()]
        lines.append(",".join([str(step), *cells]))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
