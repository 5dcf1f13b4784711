"""Typed, validated view of params.yaml, so a bad value fails before any work starts. params.yaml sets every
key: the dataclasses hold no defaults, so deleting a key fails instead of silently changing the run."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

GRANULARITIES = ("group", "query_head")  # the attention unit: a KV group (the method's) or a query head per group
METHODS = {
    "nirvana": "nirvana",
    "magnitude": "nirvana",
    "taylor": "llm_pruner",
    "wanda_sp": "uniform",
    "flap": "flap",
    "random": "nirvana",
}
"""Every criterion (`nirvana.method.criteria.CRITERIA` scores it) -> the allocation it was published with,
used when `allocation.mode` is null: the baselines' own, NIRVANA's two pools for the rest. Here, not in
the method, so that params can validate `method` without importing it."""


class ParamError(ValueError):
    """A parameter in params.yaml is missing, unknown, mistyped or out of range."""


DTYPES = ("float32", "bfloat16", "float16")
# nirvana.deploy.gguf_types.TYPES (tests/test_gguf.py checks they agree)
GGUF_TYPES = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    *("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"),
)


@dataclass(frozen=True)
class ModelParams:
    name_or_path: str
    dtype: str  # what every stage loads and computes in; unit scores sum in float32 regardless
    device_map: str | None  # null = one device (the first GPU, else the CPU); "auto" = accelerate shards
    trust_remote_code: bool

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        _check(self.device_map in (None, "auto"), "model.device_map", self.device_map, "null or auto")


KERNELS = ("portable", "native")  # nirvana.core.environment pins them


@dataclass(frozen=True)
class CpuParams:
    kernels: str  # AVX2 code paths on every x86-64 CPU (same bits anywhere), or native (faster)
    threads: int | None  # torch's threads in every stage (sums depend on it); null = this job's share of the CPUs

    def __post_init__(self) -> None:
        _check(self.kernels in KERNELS, "cpu.kernels", self.kernels, f"one of {', '.join(KERNELS)}")
        ok = self.threads is None or self.threads >= 1
        _check(ok, "cpu.threads", self.threads, "an integer >= 1, or null (the CPUs divided among the running jobs)")


@dataclass(frozen=True)
class DataParams:
    overlap_ngram: int

    def __post_init__(self) -> None:
        _check(self.overlap_ngram >= 4, "data.overlap_ngram", self.overlap_ngram, "an integer >= 4")


BUILTIN_CORPUS = "outputs/corpora/calibration.parquet"
"""prepare_data's pool of calibration passages: the default for calibration.path and finetune.path."""
USER_CALIBRATION_DIR = Path("data/calibration")


def _check_data_file(key: str, value: str, folder: Path, suffixes: tuple[str, ...]) -> None:
    """A user's data file: under `folder`, with one of `suffixes`, existing; in a
    queued experiment's copy of the repo, a file git and DVC do not track is missing: say so."""
    path = Path(value)
    kinds = " or ".join(suffixes)
    _check(path.suffix in suffixes and folder in path.parents, key, value, f"a {kinds} file under {folder}/")
    if path.is_file():
        return
    workspace = os.environ.get("DVC_ROOT")
    if workspace and Path(workspace).resolve() != Path.cwd().resolve() and (Path(workspace) / path).is_file():
        raise ParamError(
            f"params: {key} = {value!r} is in your workspace but not tracked by git or DVC, so this queued "
            f"experiment's copy of the repo lacks it: `git add` or `dvc add` it and queue again (or queue "
            f"with `dvc exp run --queue --copy-paths {value}`)"
        )
    raise ParamError(
        f"params: {key} = {value!r} is invalid; expected an existing file (queued experiments see only "
        "files that git or DVC track)"
    )


@dataclass(frozen=True)
class CalibrationParams:
    num_samples: int
    seq_len: int
    seed: int
    candidates: int
    kl_samples: int
    kl_seq_len: int
    kl_batch_size: int
    select_at_sparsity: float | None
    path: str  # the pool candidates are drawn from: the built-in one or a user's file
    source: str | None  # or a Hugging Face dataset id (path stays the built-in pool)

    @property
    def user_file(self) -> bool:
        return self.path != BUILTIN_CORPUS

    def __post_init__(self) -> None:
        for key in ("num_samples", "candidates", "kl_samples", "kl_batch_size"):
            _check(getattr(self, key) > 0, f"calibration.{key}", getattr(self, key), "a positive integer")
        _check(self.seed >= 0, "calibration.seed", self.seed, "an integer >= 0")
        for key in ("seq_len", "kl_seq_len"):
            _check(getattr(self, key) > 1, f"calibration.{key}", getattr(self, key), "an integer > 1")
        at = self.select_at_sparsity
        _check(at is None or 0 <= at < 1, "calibration.select_at_sparsity", at, "null or 0 <= value < 1")
        _check(
            not (self.user_file and self.source),
            "calibration.source",
            self.source,
            f"null when calibration.path is a file of yours (one or the other; the default path is {BUILTIN_CORPUS})",
        )
        if self.user_file:
            _check_data_file("calibration.path", self.path, USER_CALIBRATION_DIR, (".parquet",))


@dataclass(frozen=True)
class SaliencyParams:
    batch_size: int
    gradient_checkpointing: bool  # recompute activations in backward: less memory, ~30% more time

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "saliency.batch_size", self.batch_size, "a positive integer")


@dataclass(frozen=True)
class AttentionParams:
    granularity: str  # an attention unit: a whole KV group, or one query head per group

    def __post_init__(self) -> None:
        allowed = f"one of {', '.join(GRANULARITIES)}"
        _check(self.granularity in GRANULARITIES, "attention.granularity", self.granularity, allowed)


@dataclass(frozen=True)
class AllocationParams:
    MODES: typing.ClassVar[tuple[str, ...]] = ("nirvana", "uniform", "llm_pruner", "flap")

    mlp_multiple: int
    attn_multiple: int  # kept attention units per layer are a multiple of this (where the layer has more)
    mode: str | None  # null = the method's own allocation (nirvana.method.allocation.allocation_mode)
    gamma_candidates: list[float]
    band: list[int] | None  # llm_pruner's pruned layers [start, end); null = LLM-Pruner's, scaled

    def __post_init__(self) -> None:
        _check(self.mlp_multiple > 0, "allocation.mlp_multiple", self.mlp_multiple, "a positive integer")
        _check(self.attn_multiple > 0, "allocation.attn_multiple", self.attn_multiple, "a positive integer")
        modes = ", ".join(self.MODES)
        _check(self.mode is None or self.mode in self.MODES, "allocation.mode", self.mode, f"null or one of {modes}")
        g = self.gamma_candidates
        ok = len(g) > 0 and all(0 < x < math.inf for x in g) and all(a < b for a, b in itertools.pairwise(g))
        _check(ok, "allocation.gamma_candidates", g, "a non-empty, increasing list of numbers > 0 (and finite)")
        b = self.band
        ok = b is None or (len(b) == 2 and all(type(i) is int for i in b) and 0 <= b[0] < b[1])
        _check(ok, "allocation.band", b, "null or [start, end], layer indices with 0 <= start < end")


@dataclass(frozen=True)
class EvaluateParams:
    windows: list[int]
    max_tokens: int | None
    batch_size: int
    tasks: list[str]
    limit: int | None

    def __post_init__(self) -> None:
        _check(self.limit is None or self.limit > 0, "evaluate.limit", self.limit, "null or a positive integer")
        ok = len(self.windows) > 0 and all(w > 1 for w in self.windows)
        _check(ok, "evaluate.windows", self.windows, "a non-empty list of integers > 1")
        _check(
            self.max_tokens is None or self.max_tokens > 1,
            "evaluate.max_tokens",
            self.max_tokens,
            "null or an integer > 1",
        )
        _check(self.batch_size > 0, "evaluate.batch_size", self.batch_size, "a positive integer")
        _check(
            self.max_tokens is None or self.max_tokens >= max(self.windows),
            "evaluate.max_tokens",
            self.max_tokens,
            f"null or at least the longest of evaluate.windows ({max(self.windows)}), which it must fill",
        )


USER_FINETUNE_DIR = Path("data/finetune")


LOSSES = ("lm", "kd", "mix")
ADAPTERS = ("lora", "full")


@dataclass(frozen=True)
class FinetuneParams:
    launch: str
    steps: int
    path: str  # the built-in corpus as plain text, or a user's .parquet/.jsonl
    source: str | None  # or a Hugging Face dataset id (path stays the built-in corpus)
    seq_len: int
    batch_size: int
    grad_accum: int
    lr: float
    warmup_steps: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    save_steps: int
    seed: int
    loss: str  # lm (next token), kd (KL from the teacher), mix (kd_alpha x kd + (1 - kd_alpha) x lm)
    kd_temperature: float
    kd_alpha: float
    teacher: str | None  # null: this run's dense model (outputs/base_model); or a folder / model id
    adapter: str  # lora (adapters merged after training) or full (every weight trains)

    @property
    def user_file(self) -> bool:
        return self.path != BUILTIN_CORPUS

    def __post_init__(self) -> None:
        _check(self.loss in LOSSES, "finetune.loss", self.loss, f"one of {', '.join(LOSSES)}")
        _check(self.adapter in ADAPTERS, "finetune.adapter", self.adapter, f"one of {', '.join(ADAPTERS)}")
        _check(0 < self.kd_temperature < math.inf, "finetune.kd_temperature", self.kd_temperature, "a number > 0")
        _check(0 <= self.kd_alpha <= 1, "finetune.kd_alpha", self.kd_alpha, "a number in [0, 1]")
        _check(self.steps >= 0, "finetune.steps", self.steps, "an integer >= 0 (0 = pass the pruned model through)")
        for key in ("batch_size", "grad_accum", "lora_r", "save_steps"):
            _check(getattr(self, key) > 0, f"finetune.{key}", getattr(self, key), "a positive integer")
        _check(self.seq_len > 1, "finetune.seq_len", self.seq_len, "an integer > 1")
        _check(0 < self.lr < math.inf, "finetune.lr", self.lr, "a number > 0 (and finite)")
        _check(self.lora_alpha > 0, "finetune.lora_alpha", self.lora_alpha, "a number > 0")
        _check(0 <= self.lora_dropout < 1, "finetune.lora_dropout", self.lora_dropout, "0 <= value < 1")
        _check(self.warmup_steps >= 0, "finetune.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.seed >= 0, "finetune.seed", self.seed, "an integer >= 0")
        _check(
            self.launch.split()[:1] in (["python"], ["accelerate"]),
            "finetune.launch",
            self.launch,
            "'python' or an 'accelerate launch ...' command line",
        )
        _check(
            not (self.user_file and self.source),
            "finetune.source",
            self.source,
            f"null when finetune.path is a file of yours (one or the other; the default path is {BUILTIN_CORPUS})",
        )
        if self.user_file:
            _check_data_file("finetune.path", self.path, USER_FINETUNE_DIR, (".parquet", ".jsonl"))
            columns = _columns(self.path)
            ok = {"instruction", "output"} <= columns or "text" in columns
            found = f"has {', '.join(sorted(columns)) or 'no column'}"
            _check(ok, "finetune.path", self.path, f"a file with columns instruction and output, or text; it {found}")


def _columns(path: str) -> set[str]:
    """The columns of a parquet file (its schema) or a JSON-lines file (its first row), read before any work:
    a file the fine-tuning cannot use must not wait for the search, saliency and pruning to run first."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "{}")
        try:
            row = json.loads(first)
        except ValueError as err:
            raise ParamError(f"params: finetune.path = {path!r}: its first line is not JSON ({err})") from err
        return set(row) if isinstance(row, dict) else set()
    import pyarrow.parquet  # only for a user's parquet file

    try:
        return set(pyarrow.parquet.read_schema(path).names)
    except (OSError, ValueError) as err:
        raise ParamError(f"params: finetune.path = {path!r}: not a readable parquet file ({err})") from err


@dataclass(frozen=True)
class EfficiencyParams:
    batch_sizes: list[int]
    prompt_len: int
    new_tokens: int
    warmup: int
    repeats: int

    def __post_init__(self) -> None:
        ok = len(self.batch_sizes) > 0 and all(b > 0 for b in self.batch_sizes)
        _check(ok, "efficiency.batch_sizes", self.batch_sizes, "a non-empty list of positive integers")
        for key in ("prompt_len", "new_tokens", "repeats"):
            _check(getattr(self, key) > 0, f"efficiency.{key}", getattr(self, key), "a positive integer")
        _check(self.warmup >= 0, "efficiency.warmup", self.warmup, "an integer >= 0")


@dataclass(frozen=True)
class ExportParams:
    types: list[str]
    threads: int
    ppl_tokens: int  # llama.cpp and transformers perplexity over the first this many of evaluate's wiki tokens
    prompt_len: int
    new_tokens: int
    warmup: int
    repeats: int  # timed rounds at least
    max_repeats: int  # timed rounds at most, while a speedup's spread is above `spread`
    spread: float  # the standard error each speedup is timed down to

    def __post_init__(self) -> None:
        ok = len(self.types) > 0 and len(set(self.types)) == len(self.types)
        ok = ok and all(t in GGUF_TYPES for t in self.types)
        _check(ok, "export.types", self.types, f"a non-empty list of distinct types from {', '.join(GGUF_TYPES)}")
        for key in ("threads", "ppl_tokens", "prompt_len", "new_tokens", "repeats"):
            _check(getattr(self, key) > 0, f"export.{key}", getattr(self, key), "a positive integer")
        _check(self.warmup >= 0, "export.warmup", self.warmup, "an integer >= 0")
        ok = self.max_repeats >= self.repeats
        _check(ok, "export.max_repeats", self.max_repeats, f"an integer >= export.repeats ({self.repeats})")
        _check(0 < self.spread < math.inf, "export.spread", self.spread, "a number > 0 (and finite)")


@dataclass(frozen=True)
class Params:
    method: str | list[str]  # one, or several: the plan of lowest held-out KL wins (nirvana.method.selection)
    sparsity: float
    gamma: float | str  # a number, or "auto": the allocation.gamma_candidates value of lowest held-out KL
    model: ModelParams
    cpu: CpuParams
    data: DataParams
    calibration: CalibrationParams
    saliency: SaliencyParams
    attention: AttentionParams
    allocation: AllocationParams
    finetune: FinetuneParams
    evaluate: EvaluateParams
    efficiency: EfficiencyParams
    export: ExportParams

    def __post_init__(self) -> None:
        ms = self.methods
        ok = len(ms) > 0 and len(set(ms)) == len(ms) and all(m in METHODS for m in ms)
        _check(ok, "method", self.method, f"one of {', '.join(METHODS)}, or a list of distinct ones")
        _check(0 <= self.sparsity < 1, "sparsity", self.sparsity, "a number with 0 <= sparsity < 1")
        ok = self.gamma == "auto" or (not isinstance(self.gamma, str) and 0 < self.gamma < math.inf)
        _check(ok, "gamma", self.gamma, "a number > 0 (and finite), or auto")
        full_fp16 = self.model.dtype == "float16" and self.finetune.adapter == "full" and self.finetune.steps > 0
        why = "fp16 weights lose small updates; LoRA trains float32 adapters over them"
        allowed = f"lora when model.dtype = 'float16' ({why}), or model.dtype bfloat16 or float32"
        _check(not full_fp16, "finetune.adapter", self.finetune.adapter, allowed)
        self._check_ppl_tokens()

    def _check_ppl_tokens(self) -> None:
        """export.ppl_tokens are whole windows of `evaluate`'s first length, within the tokens it scores:
        gguf_perplexity measures the first of evaluate's wiki windows."""
        x, e = self.export, self.evaluate
        window, most = e.windows[0], e.max_tokens
        ok = x.ppl_tokens % window == 0 and (most is None or x.ppl_tokens <= most)
        within = "" if most is None else f", at most evaluate.max_tokens ({most})"
        _check(ok, "export.ppl_tokens", x.ppl_tokens, f"a multiple of evaluate.windows[0] ({window}){within}")

    @property
    def methods(self) -> tuple[str, ...]:
        """The criteria of `method`: one, or the several that the plan selection chooses among."""
        return (self.method,) if isinstance(self.method, str) else tuple(self.method)


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ParamError(f"params: {key} = {value!r} is invalid; expected {allowed}")


def _accepts(hint: object, value: object) -> bool:
    """True if `value` fits the type hint (ints are accepted where floats are)."""
    if isinstance(hint, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)  # type: ignore[arg-type]


def _name(hint: object) -> str:
    """A type hint as params.yaml users read it: int, float | None, list[int]."""
    return hint.__name__ if isinstance(hint, type) and typing.get_origin(hint) is None else str(hint)


def _yaml_hint(value: object) -> str:
    """Why a number can arrive as a string: quotes, or YAML 1.1 reading `1e-4` (no dot) as text."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (a number in quotes, or 1e-4 without a dot, is a string in YAML: write 1.0e-4)"


RENAMED = {"finetune.dataset": "finetune.path (a file under data/finetune/) or finetune.source (a Hugging Face id)"}
"""Keys of earlier releases, and what replaced them."""


def _build(cls: type, raw: object, prefix: str) -> object:
    """Build dataclass `cls` from a mapping, naming the exact key on any mismatch."""
    if not isinstance(raw, dict):
        raise ParamError(f"params: {prefix.rstrip('.') or 'params.yaml'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if f"{prefix}{key}" in RENAMED:
            raise ParamError(f"params: {prefix}{key} is gone; use {RENAMED[f'{prefix}{key}']}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(sorted(fields))}"
            raise ParamError(f"params: unknown key {prefix}{key}{hint}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{prefix}{key}.")
        elif not _accepts(hints[key], value):
            raise ParamError(
                f"params: {prefix}{key} = {value!r} has the wrong type; expected {_name(hints[key])}{_yaml_hint(value)}"
            )
        else:
            kwargs[key] = value
    missing = [name for name in fields if name not in kwargs]
    if missing:
        raise ParamError(
            f"params: missing key {prefix}{missing[0]}; params.yaml sets every key (`git diff params.yaml` shows a "
            "deleted one)"
        )
    return cls(**kwargs)


def schema(params: DataclassInstance, prefix: str = "") -> dict[str, dict[str, object]]:
    """Every key of params.yaml with its type and the value this run uses: what check_params validated."""
    hints = typing.get_type_hints(type(params))
    out: dict[str, dict[str, object]] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out |= schema(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = {"type": _name(hints[f.name]), "value": value}
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamError naming the offending key."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"params: {path} not found (run the stage from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"params: {path} is not valid YAML: {err}") from err
    params = _build(Params, raw, "")
    assert isinstance(params, Params)
    return params


COMMITTED = Path(__file__).resolve().parents[2] / "params.yaml"
Part = typing.TypeVar("Part", bound="DataclassInstance")


def defaults(part: type[Part], **changes: typing.Any) -> Part:
    """Params or one part of it (`defaults(FinetuneParams, steps=3)`) at the committed params.yaml's values, with
    `changes`: how code outside a stage (tests, benchmarks, a load without params) builds params without a
    second set of defaults."""
    params = load_params(COMMITTED)
    parts = [params, *(getattr(params, f.name) for f in dataclasses.fields(params))]
    return dataclasses.replace(next(p for p in parts if type(p) is part), **changes)
