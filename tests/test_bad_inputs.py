"""A bad input stops a stage before any work, as DVC would run it: exit code 1, one line on stderr
naming the culprit (the params key or the file), no traceback, and nothing written.

Every case sets up a temporary folder holding params.yaml and the inputs, and runs in this process what the
stage would: `load_params` there, then the stage script's `main` on the same paths, whose checks come first.
A few cases (WIRED) also run the real stage script, which proves `run_stage` turns the refusal into one line
and exit code 1; a stage process spends most of its seconds importing torch and transformers, so those run
all at once when the first of them asks; each test then checks its own."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import huggingface_hub
import pandas as pd
import pytest
import yaml
from pipeline_fixture import copy_run, dvc_env, lock_outs, read_lock, sh, stages_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import random_plan, random_text, tiny_llama, tiny_model_dir
from nirvana.core.errors import InputError
from nirvana.core.params import ParamError, load_params
from nirvana.core.stage import run_stage
from nirvana.method.surgery import prune_model
from nirvana.pipeline.checks import check_model, check_model_name, check_windows

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64  # the tiny models' vocabulary and context (max_position_embeddings)
SMALL = {
    "calibration": {"num_samples": 4, "seq_len": 16, "candidates": 2, "kl_samples": 4, "kl_seq_len": 16},
    "finetune": {"steps": 2, "seq_len": 16, "batch_size": 2},
    "evaluate": {"windows": [32], "max_tokens": 256, "tasks": ["piqa"], "limit": 4},
    "efficiency": {"batch_sizes": [1], "prompt_len": 16, "new_tokens": 4, "warmup": 0, "repeats": 1},
    "allocation": {"mlp_multiple": 8},  # the tiny model has 40 MLP channels a layer
    "export": {"prompt_len": 16, "new_tokens": 4, "ppl_tokens": 256},
}
MINE = "data/calibration/mine.parquet"  # a user calibration file (calibration.path)
ALPACA = "data/finetune/alpaca.jsonl"  # a user fine-tuning file (finetune.path)
DEFAULT_PATHS = {"calibration.path": "pool.parquet", "finetune.path": "pool.parquet"}  # the built-in pool's stand-in

# stage -> its input paths and output paths (all outputs under out/, so "nothing written" is one check)
STAGES = {
    "check_params": ([], ["out/params_checked.json", "out/params_schema.json", "out/environment.json"]),
    "check_inputs": (["model", "{calibration.path}", "{finetune.path}"], ["out/inputs_checked.json"]),
    "allocate_sparsity": (
        ["model", "calibration.parquet", "pool.parquet", "candidates.parquet", "saliency.parquet"],
        ["out/plan.parquet", "out/plans.parquet", "out/plan.json", "out/widths.csv"],
    ),
    "prepare_model": ([], ["out/base_model"]),
    "select_calibration": (
        ["model", "pool.parquet", "{calibration.path}"],
        ["out/calibration.parquet", "out/candidates.parquet", "out/calibration.json"],
    ),
    "compute_saliency": (["model", "calibration.parquet"], ["out/saliency.parquet"]),
    "prune": (
        ["model", "plan.parquet", "plans.parquet", "calibration.json", "candidates.parquet"],
        ["out/pruned_model", "out/prune.json"],
    ),
    "finetune": (["pruned", "{finetune.path}", "model"], ["out/finetuned_model", "out/finetune.json"]),
    "evaluate": (["model", "corpora"], ["out/metrics.json", "out/lm_eval.json"]),
    "compare": (
        ["model", "pruned", "dense.json", "pruned.json", "finetuned.json"],
        ["out/efficiency.json", "out/timings.json", "out/models.csv"],
    ),
}


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    culprit: list[str]  # every one of these must appear in the stage's error line
    params: dict = field(default_factory=dict)  # dotted key -> value, on top of SMALL
    spoil: Callable[[Path], None] | None = None  # makes one input bad, in the case's folder

    def __str__(self) -> str:
        return self.name


def user_file(table: pd.DataFrame) -> Callable[[Path], None]:
    return lambda repo: table.to_parquet(repo / MINE)


def alpaca(rows: list[dict]) -> Callable[[Path], None]:
    return lambda repo: pd.DataFrame(rows).to_json(repo / ALPACA, orient="records", lines=True)


def truncate(name: str) -> Callable[[Path], None]:
    def spoil(repo: Path) -> None:
        path = repo / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return spoil


def remove_weights(repo: Path) -> None:
    for path in (repo / "model").glob("*.safetensors"):
        path.unlink()


def larger_tokenizer(repo: Path) -> None:
    """A word-level tokenizer of 100 tokens next to a model with 64 embedding rows."""
    save_larger_tokenizer(repo / "model")


def save_larger_tokenizer(folder: Path) -> None:
    """A word-level tokenizer of 100 tokens: <unk>, v1 ... v98, </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {f"v{i}": i for i in range(1, 99)} | {"</s>": 99}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(folder)


def other_vocabulary_teacher(folder: Path) -> None:
    """A sound model folder whose vocabulary (100 tokens) is not the student's (64)."""
    tiny_llama(vocab_size=100).save_pretrained(folder)
    save_larger_tokenizer(folder)


def edit_widths(repo: Path) -> None:
    """A pruned folder whose config.json was edited by hand: layer 0 claims one MLP channel fewer."""
    path = repo / "pruned/config.json"
    config = json.loads(path.read_text())
    config["nirvana_units"][0]["mlp"] -= 1
    path.write_text(json.dumps(config))


def windows_with(token: int) -> Callable[[Path], None]:
    def spoil(repo: Path) -> None:
        rows = [[(i + j) % VOCAB for j in range(16)] for i in range(4)]
        rows[2][5] = token
        pd.DataFrame({"input_ids": rows}).to_parquet(repo / "calibration.parquet")

    return spoil


def ids(rows: int, token: int = 1, length: int = 16) -> pd.DataFrame:
    return pd.DataFrame({"input_ids": [[token] * length for _ in range(rows)]})


KEY = "allocation.gamma_candidates"

# tests/test_params.py checks sparsity 1.0, gamma 0, method magic, allocation.mode global and attention.granularity
# head with the same messages: they are not repeated here
CASES = [
    # params.yaml, through the cheapest stage
    Case("gamma_word", "allocate_sparsity", ["gamma = 'best'", "or auto"], {"gamma": "best"}),
    # gamma: auto's candidates, refused even when gamma is a number
    *(
        Case(f"gamma_candidates_{name}", "allocate_sparsity", [f"{KEY} = {text}"], {KEY: value})
        for name, text, value in (
            ("empty", "[]", []),
            ("negative", "[1.0, -2.0]", [1.0, -2.0]),
            ("zero", "[0.0, 3.0]", [0.0, 3.0]),
            ("infinite", "[3.0, inf]", [3.0, float("inf")]),
            ("nan", "[nan]", [float("nan")]),
            ("decreasing", "[3.0, 1.0]", [3.0, 1.0]),  # the search walks them in order
        )
    ),
    Case(
        "method_list_unknown", "allocate_sparsity", ["method = ['nirvana', 'magic']"], {"method": ["nirvana", "magic"]}
    ),
    Case(
        "method_list_twice",
        "allocate_sparsity",
        ["method = ['taylor', 'taylor']", "distinct"],
        {"method": ["taylor"] * 2},
    ),
    Case(
        "saliency_without_a_method",
        "allocate_sparsity",
        ["saliency.parquet has no scores for method taylor", "rerun compute_saliency"],
        {"method": ["nirvana", "taylor"]},
    ),
    Case(
        "unknown_nested_key",
        "allocate_sparsity",
        ["unknown key calibration.num_sample", "did you mean calibration.num_samples?"],
        {"calibration.num_sample": 4},
    ),
    Case(
        "string_for_int",
        "allocate_sparsity",
        ["calibration.seq_len = '16'", "wrong type"],
        {"calibration.seq_len": "16"},
    ),
    Case(
        "negative_num_samples", "allocate_sparsity", ["calibration.num_samples = -4"], {"calibration.num_samples": -4}
    ),
    # sequence lengths beyond the model's context (64)
    Case(
        "calibration_seq_len_beyond_context",
        "select_calibration",
        ["calibration.seq_len = 128", "context of 64"],
        {"calibration.seq_len": 128},
    ),
    Case(
        "evaluate_window_beyond_context",
        "evaluate",
        ["evaluate.windows[1] = 128", "context of 64"],
        {"evaluate.windows": [32, 128]},
    ),
    Case(
        "finetune_seq_len_beyond_context",
        "finetune",
        ["finetune.seq_len = 100", "context of 64"],
        {"finetune.seq_len": 100},
    ),
    Case(
        "efficiency_run_beyond_context",
        "compare",
        ["efficiency.prompt_len + efficiency.new_tokens = 66", "context of 64"],
        {"efficiency.prompt_len": 62},
    ),
    # model folders
    Case("missing_weights", "prune", ["model: no *.safetensors"], spoil=remove_weights),
    Case(
        "truncated_weights",
        "compute_saliency",
        ["model/model.safetensors", "corrupt or truncated"],
        spoil=truncate("model/model.safetensors"),
    ),
    Case(
        "tokenizer_larger_than_model", "select_calibration", ["model", "100 tokens", "has 64"], spoil=larger_tokenizer
    ),
    Case(
        "hand_edited_pruned_widths",
        "finetune",
        ["pruned", "model.layers.0.mlp.gate_proj.weight", "widths and weights disagree"],
        spoil=edit_widths,
    ),
    # calibration files
    Case(
        "empty_calibration_file", "select_calibration", [MINE, "no rows"], {"calibration.path": MINE}, user_file(ids(0))
    ),
    Case(
        "too_short_calibration_file",
        "select_calibration",
        [MINE, "3 windows", "calibration.num_samples = 4"],
        {"calibration.path": MINE},
        user_file(ids(3)),
    ),
    Case(
        "too_short_calibration_text",
        "select_calibration",
        [MINE, "1 window of calibration.seq_len = 16", "calibration.num_samples = 4"],
        {"calibration.path": MINE},
        user_file(pd.DataFrame({"text": [random_text(20, seed=0)]})),
    ),
    Case(
        "out_of_vocabulary_calibration_ids",
        "select_calibration",
        [MINE, "token id 64", "vocabulary of 64"],
        {"calibration.path": MINE},
        user_file(ids(8, token=VOCAB)),
    ),
    Case("negative_selected_ids", "compute_saliency", ["calibration.parquet", "token id -1"], spoil=windows_with(-1)),
    # sparsity beyond what the guards allow (one attention unit and allocation.mlp_multiple = 8 of the
    # 40 MLP channels kept per layer: at most (768 + 32 * 72) / (2 * 768 + 40 * 72) = 0.69565 can go)
    Case(
        "unreachable_sparsity",
        "allocate_sparsity",
        ["sparsity = 0.95 is unreachable", "8 MLP channels", "at most 0.6956 of this model"],
        {"sparsity": 0.95},
    ),
    Case("unknown_gguf_type", "allocate_sparsity", ["export.types = ['q9_0']", "q4_k_m"], {"export.types": ["q9_0"]}),
    Case(
        "bad_llm_pruner_band",
        "allocate_sparsity",
        ["allocation.band = [5, 2]", "0 <= start < end"],
        {"method": "taylor", "allocation.band": [5, 2]},
    ),
    Case(
        "llm_pruner_band_past_the_model",
        "allocate_sparsity",
        ["allocation.band = [0, 9] ends past this model's 2 layers"],
        {"method": "taylor", "allocation.band": [0, 9]},
    ),
    Case(
        "unreachable_selection_sparsity",
        "select_calibration",
        ["calibration.select_at_sparsity = 0.9 is unreachable", "at most 0.6956"],
        {"calibration.select_at_sparsity": 0.9},
    ),
    # the model name: no hub is reachable in the tests (HF_HUB_OFFLINE); checked before DVC deletes the base model
    Case(
        "misspelt_model_name",
        "check_params",
        ["model.name_or_path = 'smollm2-135'", "did you mean 'smollm2-135m'?", "HF_HUB_OFFLINE"],
        {"model.name_or_path": "smollm2-135"},
    ),
    # how the stages compute on the CPU
    Case("kernels_unknown", "check_params", ["cpu.kernels = 'fast'", "portable, native"], {"cpu.kernels": "fast"}),
    Case("threads_zero", "compute_saliency", ["cpu.threads = 0", "or null"], {"cpu.threads": 0}),
    # fine-tuning files
    # refused by check_params, the first stage, not minutes later when finetune runs (a new user's file)
    Case(
        "finetune_file_without_instruction",
        "check_params",
        ["finetune.path", ALPACA, "columns instruction and output, or text", "it has input, output"],
        {"finetune.path": ALPACA},
        alpaca([{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]),
    ),
    Case(
        "finetune_file_without_output",
        "check_params",
        [ALPACA, "columns instruction and output", "it has input, instruction"],
        {"finetune.path": ALPACA},
        alpaca([{"instruction": "Say hi", "input": ""}, {"instruction": "Add", "input": "1 2"}]),
    ),
    Case(
        "finetune_file_not_json",
        "check_params",
        ["finetune.path", ALPACA, "its first line is not JSON"],
        {"finetune.path": ALPACA},
        lambda repo: (repo / ALPACA).write_text("instruction,output\nhi,there\n"),
    ),
    Case("finetune_dataset_renamed", "finetune", ["finetune.dataset is gone"], {"finetune.dataset": "x/alpaca"}),
    # recovery settings (distillation, adapters)
    Case("loss_unknown", "finetune", ["finetune.loss = 'ce'", "one of lm, kd, mix"], {"finetune.loss": "ce"}),
    Case("adapter_unknown", "finetune", ["finetune.adapter = 'qlora'", "lora, full"], {"finetune.adapter": "qlora"}),
    Case(
        "kd_temperature_zero",
        "finetune",
        ["finetune.kd_temperature = 0", "> 0"],
        {"finetune.loss": "kd", "finetune.kd_temperature": 0},
    ),
    Case("kd_alpha_above_one", "finetune", ["finetune.kd_alpha = 1.5", "[0, 1]"], {"finetune.kd_alpha": 1.5}),
    Case(
        "teacher_of_another_vocabulary",
        "finetune",
        ["finetune.teacher: teacher has another vocabulary", "64 tokens, teacher 100"],
        {"finetune.loss": "kd", "finetune.teacher": "teacher"},
        lambda repo: other_vocabulary_teacher(repo / "teacher"),
    ),
]


# check_inputs: every check above of a stage after prepare_model that a value can fail, run before any of them
CASES += [
    Case(f"{case.name}_checked_first", "check_inputs", case.culprit, case.params, case.spoil)
    for case in CASES
    if case.name
    in (
        "calibration_seq_len_beyond_context",
        "evaluate_window_beyond_context",
        "finetune_seq_len_beyond_context",
        "efficiency_run_beyond_context",
        "too_short_calibration_text",
        "out_of_vocabulary_calibration_ids",
        "unreachable_sparsity",
        "unreachable_selection_sparsity",
        "llm_pruner_band_past_the_model",
        "teacher_of_another_vocabulary",
    )
]
CASES += [
    Case(
        "export_run_beyond_context",
        "check_inputs",
        ["export.prompt_len + export.new_tokens = 66", "context of 64"],
        {"export.prompt_len": 62},
    ),
    Case(
        "finetune_file_without_rows",
        "check_inputs",
        ["data/finetune/empty.parquet: no rows"],
        {"finetune.path": "data/finetune/empty.parquet"},
        lambda repo: pd.DataFrame({"text": pd.Series([], dtype=str)}).to_parquet(repo / "data/finetune/empty.parquet"),
    ),
    Case(  # a ValueError traceback from the model adapter in select_calibration before
        "query_heads_without_grouped_query_attention",
        "check_inputs",
        ["attention.granularity = 'query_head'", "needs grouped-query attention"],
        {"attention.granularity": "query_head"},
        lambda repo: tiny_model_dir(repo / "model", "mha"),
    ),
    Case("zero_shot_task_twice", "check_inputs", ["evaluate.tasks", "repeated"], {"evaluate.tasks": ["piqa"] * 2}),
]


def write_params(repo: Path, overrides: dict) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section] |= values
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        node = params
        for parent in parents:
            node = node[parent]
        node[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good inputs for every stage: a tiny dense and a pruned model, a pool, windows, a plan."""
    root = tmp_path_factory.mktemp("assets")
    tiny_model_dir(root / "model")
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    plan = random_plan(model)
    plan.to_parquet(root / "plan.parquet")
    plan.drop(columns="keep").assign(method="nirvana").to_parquet(root / "saliency.parquet")
    pd.DataFrame({"method": ["nirvana"], "gamma": [3.0], "selected": [True]}).to_parquet(root / "plans.parquet")
    prune_model(model, plan)
    model.save_pretrained(root / "pruned")
    AutoTokenizer.from_pretrained(root / "model").save_pretrained(root / "pruned")
    pool = pd.DataFrame({"text": [random_text(300, seed) for seed in range(10)]})
    pool.to_parquet(root / "pool.parquet")
    (root / "corpora").mkdir()
    for name in ("wiki", "books"):
        pool.to_parquet(root / "corpora" / f"{name}.parquet")
    ids(4).to_parquet(root / "calibration.parquet")
    # select_calibration's table after no search (candidates 1): nothing for allocation to reuse
    pd.DataFrame({"candidate": [0], "seed": [0], "kl": [float("nan")], "selected": [True]}).to_parquet(
        root / "candidates.parquet"
    )
    for name in ("dense", "pruned", "finetuned"):
        (root / f"{name}.json").write_text("{}")
    (root / "data/calibration").mkdir(parents=True)
    (root / "data/finetune").mkdir(parents=True)
    return root


def prepare(case: Case, assets: Path, repo: Path) -> list[str]:
    """The case's folder at `repo`, and the paths its stage takes on the command line (inputs, then outputs)."""
    shutil.copytree(assets, repo)
    write_params(repo, case.params)
    if case.spoil:
        case.spoil(repo)
    inputs, outputs = STAGES[case.stage]
    paths = DEFAULT_PATHS | {k: v for k, v in case.params.items() if k in DEFAULT_PATHS}
    return [paths.get(name.strip("{}"), name) for name in inputs] + outputs  # dvc.yaml's ${...} in the command


@cache
def stage_main(stage: str) -> Callable[..., None]:
    """The `main` of stages/<stage>.py, which run_stage calls with the validated params and the paths."""
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", ROOT / "stages" / f"{stage}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def refusal(case: Case, assets: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The line run_stage would print for the case, in this process: params.yaml loaded in the case's folder as
    the stage loads it, then the stage's main on the same paths, offline as the stage scripts run here."""
    paths = prepare(case, assets, repo)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        stage_main(case.stage)(load_params(), *paths)
    except (ParamError, InputError) as err:
        return f"[{case.stage}] {err}"
    raise AssertionError(f"{case.stage} accepted the inputs of {case.name}")


def run_case(case: Case, assets: Path, repo: Path) -> subprocess.CompletedProcess[str]:
    paths = prepare(case, assets, repo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(ROOT / "stages" / f"{case.stage}.py"), *paths]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, assets: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every selected WIRED case's folder and finished stage process, run four at a time."""
    selected = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        wired = getattr(item, "originalname", None) == "test_bad_input_stops_the_stage"
        if callspec is not None and wired and getattr(item, "module", None) is request.module:
            selected.append(callspec.params["case"])
    base = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = pool.map(lambda case: run_case(case, assets, base / case.name), selected)
        return {case.name: (base / case.name, result) for case, result in zip(selected, done, strict=True)}


def test_case_names_are_unique() -> None:
    """`runs` keys each case's folder and result by its name: two cases of one name would share them."""
    assert len({c.name for c in CASES}) == len(CASES)
    assert set(WIRED) <= {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_refused_before_any_work(
    case: Case, assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every case, in this process: the stage's params or its checks refuse it in one line naming the culprit."""
    repo = tmp_path / case.name
    message = refusal(case, assets, repo, monkeypatch)
    assert "\n" not in message, message
    for part in case.culprit:
        assert part in message, f"{part!r} not in {message!r}"
    assert not (repo / "out").exists(), sorted(p.name for p in (repo / "out").iterdir())
    assert not (repo / "checkpoints").exists()  # the fine-tune's resume folder is not made either


# through the real script: a params.yaml value (compute_saliency), the model name (check_params), a value the
# later stages refuse (check_inputs) and a model folder (finetune)
WIRED = ("threads_zero", "misspelt_model_name", "unreachable_sparsity_checked_first", "hand_edited_pruned_widths")


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("case", [case for case in CASES if case.name in WIRED], ids=str)
def test_bad_input_stops_the_stage(case: Case, runs: dict) -> None:
    repo, done = runs[case.name]
    assert done.returncode == 1, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"[{case.stage}] "), done.stderr[-3000:]
    for part in case.culprit:
        assert part in message, f"{part!r} not in {message!r}"
    assert "Traceback" not in done.stderr
    assert not (repo / "out").exists(), sorted(p.name for p in (repo / "out").iterdir())
    assert not (repo / "checkpoints").exists()  # the fine-tune's resume folder is not made either


def test_the_good_inputs_pass_every_check(assets: Path) -> None:
    """The cases fail because of what they spoil: unspoiled, the same inputs pass."""
    for folder in ("model", "pruned"):
        config = check_model(assets / folder, [("calibration.seq_len", 64)])
        check_windows(assets / "calibration.parquet", config)


def test_other_errors_are_not_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_stage turns only InputError into a one-line exit; a bug keeps its traceback."""
    write_params(tmp_path, {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stage.py", "x"])

    def bad_input(params: object, path: str) -> None:
        raise InputError(f"{path}: bad")

    def bug(params: object, path: str) -> None:
        raise KeyError("bug")

    with pytest.raises(SystemExit, match=r"^\[probe\] x: bad$"):
        run_stage("probe", bad_input)
    with pytest.raises(KeyError, match="bug"):
        run_stage("probe", bug)


def test_a_wrong_model_name_asks_the_hub_once_and_fails_in_seconds() -> None:
    """The trial's typo spent 30 s in download retries: now one request, refused at once here (nothing
    listens on port 9), names the value, the embedded models and why the Hub did not answer."""
    probe = (
        "import time; from nirvana.models.loading import check_name; from nirvana.core.errors import InputError\n"
        "start = time.perf_counter()\n"
        "try:\n    check_name('smollm2-135')\nexcept InputError as err:\n"
        "    print(f'{time.perf_counter() - start:.2f}'); print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    seconds, message = done.stdout.strip().splitlines()
    assert float(seconds) < 5, seconds
    assert message.startswith(
        "model.name_or_path = 'smollm2-135' is not an embedded model (did you mean 'smollm2-135m'?"
    )
    assert "the Hub cannot be reached (" in message, message


def test_a_model_in_the_hub_cache_passes_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_params asks about model.name_or_path on every change of params.yaml: a Hub model already downloaded
    passes without the Hub, as prepare_model loads it from the cache; a name the cache lacks still fails."""
    repo = tmp_path / "models--org--tiny"
    (repo / "snapshots/abc").mkdir(parents=True)
    (repo / "snapshots/abc/config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    check_model_name("org/tiny")
    with pytest.raises(InputError, match=r"^model.name_or_path = 'org/other' .* \(HF_HUB_OFFLINE is set\)$"):
        check_model_name("org/other")


@pytest.fixture(scope="module")
def reproduced(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's tiny run (conftest's tiny_run), reproduced and committed: a user's last run."""
    return copy_run(tiny_run, tmp_path_factory.mktemp("pipeline") / "repo")


@pytest.mark.slow
@pytest.mark.parametrize(
    "key,value,stage",
    [
        ("calibration.seq_len", 1000000, "check_inputs"),  # was refused by select_calibration, its outputs gone
        ("evaluate.windows", [64, 512], "check_inputs"),  # 512 > the context; evaluate@dense, no other stage orders
        ("sparsity", 0.95, "check_inputs"),  # unreachable
        ("model.name_or_path", "smollm2-135", "check_params"),  # was refused by prepare_model, the base model gone
    ],
)
def test_a_refused_value_deletes_no_output(reproduced: Path, key: str, value: object, stage: str) -> None:
    """A value that a stage after the checks would refuse stops `dvc repro` in one line naming it, before any
    other stage that owns outputs runs with it: their outputs and git-tracked metrics stay (issue 36, finding 8)."""
    params = (reproduced / "params.yaml").read_text()
    changed = yaml.safe_load(params)
    *parents, name = key.split(".")
    node = changed
    for parent in parents:
        node = node[parent]
    node[name] = value
    (reproduced / "params.yaml").write_text(yaml.safe_dump(changed))
    try:
        done = subprocess.run(
            ["dvc", "repro"], cwd=reproduced, env=dvc_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True
        )
        log = done.stdout + done.stderr
        assert done.returncode != 0 and "Traceback" not in log, log[-3000:]
        refusals = [line for line in log.splitlines() if line.startswith(f"[{stage}] ") and key in line]
        assert len(refusals) == 1 and f"failed to reproduce '{stage}'" in log, log[-3000:]
        assert stages_run(log) == {"check_params", stage}
        # the checks' own outputs persist (DVC leaves them while the stage runs): nothing is gone
        gone = {(owner, path) for owner, path in lock_outs(read_lock(reproduced)) if not (reproduced / path).exists()}
        assert not gone, gone
        tracked = sh(reproduced, "git", "status", "--porcelain", "metrics", "plots").splitlines()
        assert tracked == [], tracked
    finally:  # the last run as it was, for the next case
        (reproduced / "params.yaml").write_text(params)
        sh(reproduced, "git", "checkout", "--", "metrics")
        sh(reproduced, "dvc", "checkout")
