"""Stage export_gguf: GGUF files of the dense, pruned and fine-tuned models for llama.cpp / Ollama
(architecture deci, one width per layer), each with a JSON record of its SHA-256 and source folder, and
a manifest `export.json`. A model llama.cpp cannot run this way (Gemma 3, T5, a tokenizer it cannot
represent) gets a manifest that says why, and no files: the rest of the pipeline still runs. Any other export
error (a bad folder, a regression in the writer) stops the stage in one line and leaves no output."""

import json
from pathlib import Path

from nirvana.gguf import UnsupportedModel, export, prepare
from nirvana.io import atomic_path, log
from nirvana.params import Params
from nirvana.stage import run_stage


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(params: Params, dense_dir: str, pruned_dir: str, finetuned_dir: str, out_dir: str) -> None:
    folders = {"dense": dense_dir, "pruned": pruned_dir, "finetuned": finetuned_dir}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = {name: {t: tmp / f"{name}-{t}.gguf" for t in params.export.types} for name in folders}
        try:  # every check before the first file is written
            for name, by_type in files.items():
                for type, path in by_type.items():
                    prepare(folders[name], path, type)
        except UnsupportedModel as error:  # any other ExportError is an InputError: run_stage stops in one line
            write_manifest(tmp, {"unsupported": str(error)})
            log.warning("no GGUF export: %s", error)
            return
        manifest: dict = {"exported": {}}
        for name, by_type in files.items():
            manifest["exported"][name] = {}
            for type, path in by_type.items():
                record = export(folders[name], path, type)
                manifest["exported"][name][type] = {k: record[k] for k in ("gguf", "sha256", "fallbacks", "source")}
                log.info("wrote %s (%d fallback tensors)", path.name, record["fallbacks"])
        write_manifest(tmp, manifest)
    log.info("wrote %s: %d GGUF files", out_dir, sum(len(t) for t in files.values()))


if __name__ == "__main__":
    run_stage("export_gguf", main)
