"""Remote code for pruned folders: `modeling_nirvana.py` (next to this file) goes into every folder
whose config records pruned widths, and `auto_map` in its config.json names the class to load, so
`from_pretrained(folder, trust_remote_code=True)` builds the pruned model without `nirvana` installed.

Without `trust_remote_code`, transformers keeps building the stock class for the known `model_type`
(which `import nirvana` shrinks), so the pipeline itself never runs the copied file.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from transformers import PretrainedConfig

MODELING_FILE = "modeling_nirvana.py"
CLASSES = {  # model_type -> (Auto class, class in modeling_nirvana.py)
    "llama": ("AutoModelForCausalLM", "NirvanaLlamaForCausalLM"),
    "mistral": ("AutoModelForCausalLM", "NirvanaMistralForCausalLM"),
    "qwen2": ("AutoModelForCausalLM", "NirvanaQwen2ForCausalLM"),
    "gemma3_text": ("AutoModelForCausalLM", "NirvanaGemma3ForCausalLM"),
    "t5": ("AutoModelForSeq2SeqLM", "NirvanaT5ForConditionalGeneration"),
}
PRUNED_KEYS = ("nirvana_units", "nirvana_output_bias")  # surgery's CONFIG_KEY and BIAS_KEY


def modeling_source() -> str:
    """The text of the modeling file shipped with this package."""
    return resources.files("nirvana.models").joinpath(MODELING_FILE).read_text(encoding="utf-8")


def add_remote_code(folder: str | Path, config: PretrainedConfig) -> bool:
    """Copy the modeling file into a saved pruned folder and point config.json's `auto_map` at its class;
    a dense folder (no recorded widths or biases) is left alone. Returns whether it added anything."""
    model_type = getattr(config, "model_type", None)
    if model_type not in CLASSES or not any(getattr(config, key, None) for key in PRUNED_KEYS):
        return False
    folder = Path(folder)
    (folder / MODELING_FILE).write_text(modeling_source(), encoding="utf-8")
    path = folder / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    auto, name = CLASSES[model_type]
    saved["auto_map"] = {**saved.get("auto_map", {}), auto: f"{Path(MODELING_FILE).stem}.{name}"}
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True
