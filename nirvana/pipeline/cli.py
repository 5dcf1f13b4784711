"""`nirvana` command line: look inside models the pipeline wrote, check their weights against their model
cards, export them to GGUF for llama.cpp, sweep methods, tabulate experiments, audit the committed run."""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

import torch

from nirvana.core.params import METHODS
from nirvana.deploy.card import read_card
from nirvana.deploy.gguf import export as export_gguf
from nirvana.deploy.gguf_types import TYPES
from nirvana.deploy.verify import provenance_line, verify_folder
from nirvana.evaluation.perplexity import param_counts
from nirvana.method.surgery import layer_units
from nirvana.models.loading import load_model, load_tokenizer, skeleton
from nirvana.pipeline.audit import AuditError
from nirvana.pipeline.audit import audit as audit_run
from nirvana.pipeline.checks import check_model_folder
from nirvana.pipeline.report import readme_table, report
from nirvana.pipeline.sweep import sweep


def info(path: str) -> None:
    """Print parameter counts and per-layer widths (KV groups, MLP channels) as JSON, counted on the meta device
    once the weights' shapes are checked against config.json: no weight is read, none goes to a GPU."""
    check_model_folder(path)
    model = skeleton(path)
    print(json.dumps({**param_counts(model), "layers": layer_units(model)}, indent=1))


def generate(path: str, prompt: str, max_new_tokens: int) -> None:
    """Greedy continuation of `prompt`, to eyeball what pruning did to a model; the prompt goes where the model
    is (the first GPU, else the CPU)."""
    check_model_folder(path)
    model, tokenizer = load_model(path), load_tokenizer(path)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
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


def audit(scratch: str | None) -> None:
    """Rerun the committed pipeline in a scratch clone and compare every output with dvc.lock; exit 1 naming
    the package, the damaged output or the outputs that did not come back."""
    passed, report = audit_run(".", scratch)
    print(report)
    if not passed:
        sys.exit(1)


def export(path: str, out: str, type: str) -> None:
    """Write a GGUF file (llama.cpp's deci architecture) and its JSON record."""
    record = export_gguf(path, out, type)
    print(f"{out}: {record['type']}, {record['fallbacks']} fallback tensors, sha256 {record['sha256']}")


def tabulate(readme: bool, sort: str | None, wide: bool) -> None:
    """Print every experiment's table, or with `readme` the committed run's, which takes no other option."""
    if not readme:
        print(report(sort, wide), end="")
        return
    ignored = [flag for flag, given in (("--sort", sort is not None), ("--all", wide)) if given]
    if ignored:
        raise ValueError(f"--readme prints the committed run's table only and takes no {ignored[0]}")
    print(readme_table(), end="")


def fail(command: str, error: Exception) -> NoReturn:
    """A user's mistake: one line on stderr, exit code 1, no traceback."""
    print(f"nirvana {command}: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(1)


def parser() -> argparse.ArgumentParser:
    """Every command and its options."""
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
        "sweep", help="one DVC experiment per method and sparsity, through fine-tuning, compare and llama.cpp"
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
    p_audit = sub.add_parser(
        "audit", help="rerun the committed pipeline from nothing in a scratch clone and compare every output"
    )
    p_audit.add_argument("--scratch", metavar="DIR", help="rerun there and keep it (default: a temporary folder)")
    return parser


def run(args: argparse.Namespace) -> None:
    """The command `args` names."""
    if args.command == "info":
        info(args.model)
    elif args.command == "generate":
        generate(args.model, args.prompt, args.max_new_tokens)
    elif args.command == "verify":
        verify(args.model)
    elif args.command == "audit":
        audit(args.scratch)
    elif args.command == "export":
        export(args.model, args.out, args.type)
    elif args.command == "sweep":
        sweep(args.methods, args.sparsities, args.set, args.queue, args.share, args.jobs)
    else:
        tabulate(args.readme, args.sort, args.all)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, AuditError) as error:  # ParamError, InputError and ExportError are ValueErrors
        fail(args.command, error)


if __name__ == "__main__":
    main()
