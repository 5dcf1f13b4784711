"""Stage export_gguf (one per model: dense, pruned, fine-tuned): a model folder's GGUF files for llama.cpp /
Ollama (architecture deci, one width per layer), one per export.types entry, named `<folder name>-<type>.gguf`
after the output folder, each with a JSON record of its SHA-256 and source folder, and a manifest `export.json`.
A model llama.cpp cannot run this way (Gemma 3, T5, a tokenizer it cannot represent) gets a manifest that says
why, and no files: the rest of the pipeline still runs. Any other export error (a bad folder, a regression in
the writer) stops the stage in one line and leaves no output."""

import json
from pathlib import Path

from nirvana.core.io import atomic_path, log
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.deploy.gguf import export, prepare
from nirvana.deploy.gguf_errors import UnsupportedModel

RECORDED = ("gguf", "sha256", "fallbacks", "source")  # what the manifest keeps of each file's record


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main(params: Params, model_dir: str, out_dir: str) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = {type: tmp / f"{Path(out_dir).name}-{type}.gguf" for type in params.export.types}
        try:  # every check before the first file is written
            for type, path in files.items():
                prepare(model_dir, path, type)
        except UnsupportedModel as error:  # any other ExportError is an InputError: run_stage stops in one line
            write_manifest(tmp, {"unsupported": str(error)})
            log.warning("no GGUF export of %s: %s", model_dir, error)
            return
        exported = {}
        for type, path in files.items():
            record = export(model_dir, path, type)
            exported[type] = {k: record[k] for k in RECORDED}
            log.info("wrote %s (%d fallback tensors)", path.name, record["fallbacks"])
        write_manifest(tmp, {"exported": exported})
    log.info("wrote %s: %d GGUF files of %s", out_dir, len(files), model_dir)


if __name__ == "__main__":
    run_stage("export_gguf", main)
