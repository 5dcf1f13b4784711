"""Stage export_gguf: GGUF files of the dense, pruned and fine-tuned models for llama.cpp / Ollama
(architecture deci, one width per layer), each with a JSON record of its SHA-256 and source folder, and
a manifest `export.json`. An architecture llama.cpp cannot run with per-layer widths (Gemma 3, T5) gets
a manifest that says why, and no files: the rest of the pipeline still runs."""

import json

from nirvana.gguf import ExportError, check_folder, export, prepare
from nirvana.io import atomic_path, log
from nirvana.params import Params
from nirvana.stage import run_stage


def main(params: Params, dense_dir: str, pruned_dir: str, finetuned_dir: str, out_dir: str) -> None:
    folders = {"dense": dense_dir, "pruned": pruned_dir, "finetuned": finetuned_dir}
    try:
        check_folder(dense_dir)
    except ExportError as error:  # the architecture, not the input, rules out llama.cpp
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            (tmp / "export.json").write_text(json.dumps({"unsupported": str(error)}, indent=2) + "\n")
        log.warning("no GGUF export: %s", error)
        return
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        files = {name: {t: tmp / f"{name}-{t}.gguf" for t in params.export.types} for name in folders}
        for name, by_type in files.items():  # every check before the first file is written
            for type, path in by_type.items():
                prepare(folders[name], path, type)
        manifest: dict = {"exported": {}}
        for name, by_type in files.items():
            manifest["exported"][name] = {}
            for type, path in by_type.items():
                record = export(folders[name], path, type)
                manifest["exported"][name][type] = {k: record[k] for k in ("gguf", "sha256", "fallbacks", "source")}
                log.info("wrote %s (%d fallback tensors)", path.name, record["fallbacks"])
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s: %d GGUF files", out_dir, sum(len(t) for t in files.values()))


if __name__ == "__main__":
    run_stage("export_gguf", main)
