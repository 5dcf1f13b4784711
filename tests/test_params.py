"""A bad parameter fails up front with a message that names the key, the value and what is allowed."""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from nirvana.core.params import METHODS, AllocationParams, FinetuneParams, ParamError, Params, defaults, load_params
from nirvana.method.criteria import CRITERIA

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, **changes: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = params
        for parent in parents:
            node = node[parent]
        node[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_every_method_has_a_criterion() -> None:
    assert set(METHODS) == set(CRITERIA)


def test_the_committed_params_are_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.method == "nirvana" and 0 < params.sparsity < 1


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"sparsity": 1.0}, r"sparsity = 1.0 is invalid; expected a number with 0 <= sparsity < 1"),
        ({"sparsity": -0.1}, r"sparsity = -0.1 is invalid"),
        ({"gamma": 0}, r"gamma = 0 is invalid; expected a number > 0"),
        ({"method": "magic"}, r"method = 'magic' is invalid; expected one of nirvana"),
        ({"calibration__num_samples": 0}, r"calibration.num_samples = 0 is invalid"),
        ({"calibration__seq_len": "128"}, r"calibration.seq_len = '128' has the wrong type"),
        ({"saliency__batch_size": 2.5}, r"saliency.batch_size = 2.5 has the wrong type"),
        ({"finetune__steps": -1}, r"finetune.steps = -1 is invalid; expected an integer >= 0"),
        ({"finetune__lora_dropout": 1.0}, r"finetune.lora_dropout = 1.0 is invalid"),
        ({"finetune__launch": "torchrun"}, r"finetune.launch = 'torchrun' is invalid; expected 'python' or an"),
        ({"finetune__path": "mine.jsonl"}, r"finetune.path = 'mine.jsonl' is invalid; expected a .parquet or .jsonl "),
        ({"finetune__path": "data/finetune/none.jsonl"}, r"finetune.path = .* expected an existing file \(queued"),
        ({"finetune__dataset": "x/y"}, r"finetune.dataset is gone; use finetune.path \(a file under data/finetune/\)"),
        (
            {"calibration__path": "data/calibration/README.md", "calibration__source": "x/y"},
            r"calibration.source = 'x/y' is invalid; expected null when calibration.path is a file of yours",
        ),
        ({"finetune__lr": "1e-4"}, r"finetune.lr = '1e-4' has the wrong type"),
        ({"allocation__mode": "global"}, r"allocation.mode = 'global' is invalid; expected null or one of nirvana, "),
        ({"allocation__mode": 1}, r"allocation.mode = 1 has the wrong type"),
        ({"evaluate__windows": []}, r"evaluate.windows = \[\] is invalid"),
        ({"calibration__num_sample": 8}, r"unknown key calibration.num_sample; did you mean calibration.num_samples\?"),
        ({"sparsty": 0.3}, r"unknown key sparsty; did you mean sparsity\?"),
        ({"finetune__lora": 4}, r"unknown key finetune.lora; did you mean finetune.lora_r\?"),
        ({"saliency__batch_size": True}, r"saliency.batch_size = True has the wrong type; expected int$"),
        ({"sparsity": False}, r"sparsity = False has the wrong type; expected float"),
        (
            {"evaluate__windows": [128, True]},
            r"evaluate.windows = \[128, True\] has the wrong type; expected list\[int\]",
        ),
        ({"calibration": 8}, r"params: calibration must be a mapping, got 8"),
        ({"gamma": float("inf")}, r"gamma = inf is invalid; expected a number > 0"),
        ({"sparsity": float("nan")}, r"sparsity = nan is invalid"),
        ({"attention__granularity": "head"}, r"attention.granularity = 'head' is invalid; expected one of group, "),
        ({"calibration__seed": -1}, r"calibration.seed = -1 is invalid; expected an integer >= 0"),
        ({"finetune__seed": -1}, r"finetune.seed = -1 is invalid; expected an integer >= 0"),
        ({"calibration__kl_seq_len": 1}, r"calibration.kl_seq_len = 1 is invalid; expected an integer > 1"),
        ({"evaluate__max_tokens": 100}, r"evaluate.max_tokens = 100 is invalid; expected null or at least the longest"),
        ({"finetune__lr": "1e-4"}, r"YAML: write 1.0e-4\)$"),
        (
            {"export__ppl_tokens": 2000},
            r"^params: export.ppl_tokens = 2000 is invalid; expected a multiple of evaluate.windows\[0\] \(128\), "
            r"at most evaluate.max_tokens \(8192\)$",
        ),
        (
            {"export__ppl_tokens": 8320},
            r"export.ppl_tokens = 8320 is invalid; .* at most evaluate.max_tokens \(8192\)$",
        ),
        ({"export__ppl_tokens": 0}, r"export.ppl_tokens = 0 is invalid; expected a positive integer$"),
        ({"evaluate__windows": [100]}, r"export.ppl_tokens = 2048 is invalid; expected a multiple of evaluate.windows"),
        (
            {"export__max_repeats": 2},
            r"export.max_repeats = 2 is invalid; expected an integer >= export.repeats \(3\)$",
        ),
        ({"export__spread": 0}, r"export.spread = 0 is invalid; expected a number > 0"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ParamError, match=message):
        load_params(write(tmp_path, **changes))


def test_the_gguf_perplexity_tokens_fit_evaluate_windows(tmp_path: Path) -> None:
    """export.ppl_tokens are whole windows of evaluate's first length within the tokens it scores: all of them,
    or any number of windows when evaluate.max_tokens is null (the whole set)."""
    assert load_params(write(tmp_path, export__ppl_tokens=8192)).export.ppl_tokens == 8192
    whole = load_params(write(tmp_path, evaluate__max_tokens=None, export__ppl_tokens=16384))
    assert whole.export.ppl_tokens == 16384
    windows = load_params(write(tmp_path, evaluate__windows=[64, 2048], export__ppl_tokens=192))
    assert windows.export.ppl_tokens == 192  # evaluate.windows[0] is the one that counts


def test_every_method_and_allocation_mode_is_accepted(tmp_path: Path) -> None:
    for method in METHODS:
        for mode in (None, *AllocationParams.MODES):
            params = load_params(write(tmp_path, method=method, allocation__mode=mode))
            assert (params.method, params.allocation.mode) == (method, mode)


def test_a_missing_or_broken_params_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match=r"params: .*params.yaml not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("sparsity: [0.2\n")
    with pytest.raises(ParamError, match=r"params: .*params.yaml is not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_a_queued_run_names_a_file_left_untracked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued experiment runs in a copy of the repo holding only what git and DVC track, with DVC_ROOT
    naming the user's workspace: a file there but not in the copy is named as untracked."""
    workspace, copy = tmp_path / "workspace", tmp_path / "copy"
    (workspace / "data/calibration").mkdir(parents=True)
    (workspace / "data/calibration/mine.parquet").write_bytes(b"rows")
    copy.mkdir()
    params = write(copy, calibration__path="data/calibration/mine.parquet")
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    with pytest.raises(ParamError, match=r"is in your workspace but not tracked by git or DVC.*`git add` or `dvc add`"):
        load_params(params)
    monkeypatch.setenv("DVC_ROOT", str(copy))  # a plain `dvc repro`: the file is simply missing
    with pytest.raises(ParamError, match=r"expected an existing file"):
        load_params(params)


def dotted(tree: dict, prefix: str = "") -> dict[str, object]:
    """params.yaml's keys, sections included, as check_params names them, with their values."""
    found: dict[str, object] = {}
    for key, value in tree.items():
        found[f"{prefix}{key}"] = value
        if isinstance(value, dict):
            found |= dotted(value, f"{prefix}{key}.")
    return found


COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())
VALUES = {key: value for key, value in dotted(COMMITTED).items() if not isinstance(value, dict)}


def test_deleting_any_key_fails_naming_it(tmp_path: Path) -> None:
    """params.yaml is the one source of values: a deleted key, or section, is refused, not replaced by a default
    that may differ from the committed value (issue 36, finding 9)."""
    for key in dotted(COMMITTED):
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        *parents, name = key.split(".")
        node = params
        for parent in parents:
            node = node[parent]
        del node[name]
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(ParamError, match=rf"^params: missing key {re.escape(key)}; params.yaml sets every key"):
            load_params(tmp_path / "params.yaml")


def test_the_dataclasses_hold_no_value() -> None:
    params = load_params(ROOT / "params.yaml")
    for part in [params, *(getattr(params, f.name) for f in dataclasses.fields(params))]:
        if dataclasses.is_dataclass(part):
            unset = (dataclasses.MISSING,) * 2
            assert all((f.default, f.default_factory) == unset for f in dataclasses.fields(part)), type(part)


def test_params_built_outside_a_stage_take_the_committed_values() -> None:
    committed = load_params(ROOT / "params.yaml")
    assert defaults(Params) == committed
    assert defaults(FinetuneParams, steps=3) == dataclasses.replace(committed.finetune, steps=3)
    with pytest.raises(ParamError, match=r"finetune.steps = -1 is invalid"):
        defaults(FinetuneParams, steps=-1)


def test_the_schema_gives_each_keys_type_and_the_value_this_run_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_params writes the committed values, not a second set of defaults; and the keys it checked, which the
    stages it orders first depend on: they change with the code only."""
    spec = importlib.util.spec_from_file_location("check_params", ROOT / "stages/check_params.py")
    assert spec is not None and spec.loader is not None
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stage.main(load_params(ROOT / "params.yaml"), *(str(tmp_path / name) for name in ("keys", "schema", "env")))
    schema = json.loads((tmp_path / "schema").read_text())
    assert {key: entry["value"] for key, entry in schema.items()} == VALUES
    assert schema["finetune.lr"] == {"type": "float", "value": COMMITTED["finetune"]["lr"]}
    assert sorted(json.loads((tmp_path / "keys").read_text())["checked"]) == sorted(VALUES)
    stage.main(defaults(Params, sparsity=0.5), *(str(tmp_path / name) for name in ("keys2", "schema2", "env2")))
    assert (tmp_path / "keys2").read_bytes() == (tmp_path / "keys").read_bytes()
