"""`nirvana` command line: look inside models the pipeline wrote, check their weights against their model
cards, export them to GGUF for llama.cpp, sweep methods, tabulate experiments."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from nirvana.card import provenance_line, read_card, verify_folder
from nirvana.evaluation import param_counts
from nirvana.gguf import TYPES, ExportError
from nirvana.gguf import export as export_gguf
from nirvana.modeling import load_model, load_tokenizer
from nirvana.params import METHODS
from nirvana.report import readme_table, report
from nirvana.surgery import layer_units
from nirvana.sweep import sweep


def info(path: str) -> None:
    """Print parameter counts and per-layer widths (KV groups, MLP channels) as JSON."""
    model = load_model(path)
    print(json.dumps({**param_counts(model), "layers": layer_units(model)}, indent=1))


def generate(path: str, prompt: str, max_new_tokens: int) -> None:
    """Greedy continuation of `prompt`, to eyeball what pruning did to a model."""
    model, tokenizer = load_model(path), load_tokenizer(path)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[operator]
    print(tokenizer.decode(out[0], skip_special_tokens=True))


def verify(path: str) -> None:
    """Recompute a model folder's tensor hashes and check them against its card (README.md), and name the
    commit whose dvc.lock made it; exit 1 naming every missing, extra or changed file and tensor."""
    ok, message = verify_folder(path)
    if not ok:
        sys.exit(message)
    print(message)
    print(f"{path}: {provenance_line(read_card(path).get('nirvana') or {}, path)}")


def export(path: str, out: str, type: str) -> None:
    """Write a GGUF file (llama.cpp's deci architecture) and its JSON record; exit 1 with one line on bad input."""
    try:
        record = export_gguf(path, out, type)
    except ExportError as error:
        print(f"nirvana export: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"{out}: {record['type']}, {record['fallbacks']} fallback tensors, sha256 {record['sha256']}")


def tabulate(sort: str | None, wide: bool) -> None:
    """Print every experiment's table; exit 1 with one line when the sort column does not exist."""
    try:
        print(report(sort, wide), end="")
    except ValueError as error:
        print(f"nirvana report: {error}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nirvana", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="parameter counts and per-layer widths of a model folder")
    p_info.add_argument("model")
    p_gen = sub.add_parser("generate", help="greedy text from a model folder")
    p_gen.add_argument("model")
    p_gen.add_argument("prompt")
    p_gen.add_argument("--max-new-tokens", type=int, default=40)
    p_verify = sub.add_parser("verify", help="check a pruned folder's weights against the hashes in its model card")
    p_verify.add_argument("model")
    p_export = sub.add_parser("export", help="GGUF for llama.cpp / Ollama (architecture deci, per-layer widths)")
    p_export.add_argument("model")
    p_export.add_argument("out", help="the .gguf file, under outputs/")
    p_export.add_argument("--type", default="f16", help=f"one of {', '.join(TYPES)} (default f16)")
    p_report = sub.add_parser("report", help="Markdown table of all DVC experiments (run in the repository)")
    p_report.add_argument("--readme", action="store_true", help="only the README's table of the committed run")
    p_report.add_argument(
        "--sort", metavar="METRIC", help="best first on a metric column, e.g. ppl_wiki_128 (lowest) or acc_average"
    )
    p_report.add_argument(
        "--all", action="store_true", help="also allocation, parameters, each task's accuracy and the speedups"
    )
    p_sweep = sub.add_parser(
        "sweep", help="one DVC experiment per method and sparsity, through fine-tuning and compare"
    )
    p_sweep.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p_sweep.add_argument("--sparsities", nargs="+", type=float, required=True)
    p_sweep.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more `dvc exp run -S` settings")
    p_sweep.add_argument("--queue", action="store_true", help="only queue them; run them with --jobs or dvc queue")
    p_sweep.add_argument(
        "--jobs", type=int, metavar="N", help="queue them and run N at once, each with 1/N of the CPUs (NIRVANA_JOBS)"
    )
    p_sweep.add_argument(
        "--share", action="store_true", help="pull the default DVC remote's run-cache first, push each result to it"
    )
    args = parser.parse_args(argv)
    if args.command == "info":
        info(args.model)
    elif args.command == "generate":
        generate(args.model, args.prompt, args.max_new_tokens)
    elif args.command == "verify":
        verify(args.model)
    elif args.command == "export":
        export(args.model, args.out, args.type)
    elif args.command == "sweep":
        try:
            sweep(args.methods, args.sparsities, args.set, args.queue, args.share, args.jobs)
        except ValueError as error:  # a bad argument or an unusable remote: one line, before or instead of the runs
            sys.exit(str(error))
    elif args.readme:
        print(readme_table(), end="")
    else:
        tabulate(args.sort, args.all)


if __name__ == "__main__":
    main()
