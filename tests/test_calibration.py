"""KL calibration selection: the KL itself, the search, and calibration data users bring."""

import copy
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import load_stage, random_plan, random_text, tiny_llama, tiny_model_dir
from nirvana.core.errors import InputError
from nirvana.core.params import AllocationParams, CalibrationParams, Params, defaults
from nirvana.deploy.card import calibration_record
from nirvana.method.calibration import draw, select_windows
from nirvana.method.kl import HeldOut
from nirvana.method.surgery import prune_model

ROOT = Path(__file__).resolve().parents[1]
KL_WINDOWS = torch.randint(0, 64, (7, 9), generator=torch.Generator().manual_seed(2))


def test_kl_matches_a_direct_computation_and_chunking_changes_nothing() -> None:
    dense = tiny_llama("gqa")
    pruned = copy.deepcopy(dense)
    prune_model(pruned, random_plan(dense, seed=1))
    with torch.no_grad():
        log_p = torch.log_softmax(dense(input_ids=KL_WINDOWS).logits, -1)
        log_q = torch.log_softmax(pruned(input_ids=KL_WINDOWS).logits, -1)
    expected = F.kl_div(log_q, log_p, log_target=True, reduction="sum").item() / KL_WINDOWS.numel()
    for batch_size in (1, 3, 7):
        assert HeldOut.of(dense, KL_WINDOWS, batch_size).kl(pruned) == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    assert HeldOut.of(dense, KL_WINDOWS, 4).kl(dense) == pytest.approx(0, abs=1e-7)


def test_search_picks_the_candidate_with_the_lowest_kl() -> None:
    pool = torch.randint(0, 64, (40, 8), generator=torch.Generator().manual_seed(3))
    params = defaults(
        Params,
        sparsity=0.4,
        gamma=3.0,
        allocation=defaults(AllocationParams, mlp_multiple=8),
        calibration=defaults(CalibrationParams, num_samples=4, candidates=4, kl_batch_size=4),
    )
    windows, table = select_windows(tiny_llama("gqa"), pool, KL_WINDOWS, params)
    assert table["kl"].nunique() == 4 and table["seed"].tolist() == [0, 1, 2, 3]
    winner = table.loc[table.selected].iloc[0]
    assert table.selected.sum() == 1 and winner.kl == table.kl.min()
    assert torch.equal(windows, pool[winner.windows])


def test_one_candidate_is_a_seeded_draw_without_a_model() -> None:
    pool = torch.arange(200).view(20, 10)
    params = defaults(Params, calibration=defaults(CalibrationParams, num_samples=5, candidates=1, seed=7))
    first, table = select_windows(None, pool, KL_WINDOWS, params)
    again, _ = select_windows(None, pool, KL_WINDOWS, params)
    assert torch.equal(first, again) and first.shape == (5, 10) and table.selected.all()


def run_select_stage(repo: Path, calibration: dict) -> subprocess.CompletedProcess:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["calibration"] |= calibration
    params["allocation"] |= {"mlp_multiple": 8}  # the tiny model has 40 MLP channels a layer
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    outs = ["out/calibration.parquet", "out/candidates.parquet", "out/calibration.json"]
    pool = calibration.get("path", "pool.parquet")  # dvc.yaml passes calibration.path: the built-in pool by default
    return subprocess.run(
        [sys.executable, str(ROOT / "stages/select_calibration.py"), "model", "pool.parquet", pool, *outs],
        cwd=repo,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    tiny_model_dir(tmp_path / "model")
    pd.DataFrame({"text": [random_text(300, seed) for seed in range(10)]}).to_parquet(tmp_path / "pool.parquet")
    (tmp_path / "data/calibration").mkdir(parents=True)
    return tmp_path


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_user_input_ids_are_used_verbatim(repo: Path) -> None:
    mine = pd.DataFrame({"input_ids": [[5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6], [9, 9, 9, 9, 9, 9]]})
    mine.to_parquet(repo / "data/calibration/mine.parquet")
    done = run_select_stage(
        repo, {"path": "data/calibration/mine.parquet", "candidates": 1, "kl_samples": 4, "kl_seq_len": 16}
    )
    assert done.returncode == 0, done.stderr
    assert (
        pd.read_parquet(repo / "out/calibration.parquet")["input_ids"].map(list).tolist() == mine["input_ids"].tolist()
    )
    # the model card names the file and its hash (and the number of windows taken from it)
    record = calibration_record(repo / "out/calibration.json", repo / "out/candidates.parquet")
    assert record is not None
    assert record["pool"] == "data/calibration/mine.parquet" and record["windows"] == 3
    assert record["pool_sha256"] == hashlib.sha256((repo / "data/calibration/mine.parquet").read_bytes()).hexdigest()


@pytest.mark.slow  # a stage, llama.cpp or lm-eval run whole
def test_search_stage_on_a_tiny_model_writes_table_and_metrics(repo: Path) -> None:
    done = run_select_stage(
        repo, {"num_samples": 4, "seq_len": 16, "candidates": 3, "kl_samples": 8, "kl_seq_len": 16, "kl_batch_size": 4}
    )
    assert done.returncode == 0, done.stderr
    table = pd.read_parquet(repo / "out/candidates.parquet")
    assert len(table) == 3 and table.selected.sum() == 1 and table.kl.notna().all()
    assert set(table["pool"]) == {"pool.parquet"}  # the built-in pool, as the command line named it
    metrics = yaml.safe_load((repo / "out/calibration.json").read_text())
    assert metrics["kl_selected"] == table.kl.min() <= metrics["kl_median"] <= metrics["kl_worst"]


@pytest.mark.parametrize(
    "calibration,message",
    [
        (
            {"path": "elsewhere/mine.parquet"},
            "calibration.path = 'elsewhere/mine.parquet' is invalid; expected a .parquet file under data/calibration/",
        ),
        ({"path": "data/calibration/missing.parquet"}, "expected an existing file"),
        ({"candidates": 0}, "calibration.candidates = 0 is invalid"),
    ],
)
@pytest.mark.slow  # a stage run whole (until it stops)
def test_bad_calibration_params_stop_before_any_work(repo: Path, calibration: dict, message: str) -> None:
    done = run_select_stage(repo, calibration)
    assert done.returncode != 0 and message in done.stderr
    assert not (repo / "out").exists()


SEARCH = defaults(
    CalibrationParams, num_samples=4, seq_len=16, candidates=2, kl_samples=8, kl_seq_len=16, kl_batch_size=4
)
TINY_MLP = defaults(AllocationParams, mlp_multiple=8)  # the tiny model has 40 MLP channels a layer
OUTS = ("out/calibration.parquet", "out/candidates.parquet", "out/calibration.json")


def test_a_search_resumes_only_rows_written_by_the_same_code(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A search interrupted before a code change must not resume its rows after it: a planted row (kl -1) is
    resumed by the same code only."""
    stage, params = load_stage("select_calibration"), defaults(Params, calibration=SEARCH, allocation=TINY_MLP)
    monkeypatch.chdir(repo)

    def run(code: str) -> pd.DataFrame:
        monkeypatch.setattr(stage, "code_digest", lambda script: code)
        stage.main(params, "model", "pool.parquet", "pool.parquet", *OUTS)
        return pd.read_parquet(OUTS[1])

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # stopped once every candidate's row is saved, before any output
        patch.setattr(stage, "write_parquet", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run("old")
    (folder,) = (repo / "checkpoints/select_calibration").iterdir()
    row = json.loads((folder / "candidate-0.json").read_text())
    (folder / "candidate-0.json").write_text(json.dumps(row | {"kl": -1.0}))
    assert (run("new")["kl"] > 0).all()  # computed afresh
    assert run("old")["kl"].tolist()[0] == -1.0  # the planted row, resumed by the code that wrote it
    assert not any((repo / "checkpoints/select_calibration").iterdir())


def test_more_samples_than_windows_stop_the_stage_in_one_line_before_any_work(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = load_stage("select_calibration")
    monkeypatch.chdir(repo)
    monkeypatch.setattr(stage, "load_model", None)  # never reached
    params = defaults(Params, calibration=dataclasses.replace(SEARCH, num_samples=5000), allocation=TINY_MLP)
    with pytest.raises(InputError) as err:
        stage.main(params, "model", "pool.parquet", "pool.parquet", *OUTS)
    message = str(err.value)
    assert message.startswith("params: calibration.num_samples = 5000 exceeds the ") and "\n" not in message
    available = int(message.split("exceeds the ")[1].split()[0])
    assert 0 < available < 5000
    assert not (repo / "out").exists() and not (repo / "checkpoints").exists()
    with pytest.raises(InputError, match=r"^params: calibration\.num_samples = 6 exceeds the 5 windows"):
        draw(torch.zeros(5, 4), 6, seed=0)
