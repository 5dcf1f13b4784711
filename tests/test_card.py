"""The prune and finetune stages leave a model card (README.md) that records where the model came from
and the SHA-256 of every stored tensor; `nirvana verify` catches a changed byte, a missing file."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import random_plan, random_text, tiny_model_dir
from nirvana.core.params import FinetuneParams, ModelParams, Params, defaults
from nirvana.deploy.card import CARD, card_data, finetune_record, model_card, read_card
from nirvana.deploy.hashes import code_state, lock_state
from nirvana.deploy.verify import lock_commits, verify_folder
from nirvana.method.surgery import layer_units, save_model
from nirvana.pipeline.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
BASE = "HuggingFaceTB/SmolLM2-135M"
CALIBRATION = {"candidates": 3, "kl_median": 0.5, "kl_selected": 0.25, "kl_worst": 0.75}


def sh(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True)


def stage(repo: Path, name: str, params: Params, *paths: str) -> None:
    """Run a stage script's `main` in this process (a subprocess would import torch again), in `repo`."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / f"stages/{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(repo)
        module.main(params, *paths)


def verify(folder: Path) -> subprocess.CompletedProcess[str]:
    """`nirvana verify` as a user runs it."""
    return sh(folder.parent, sys.executable, "-m", "nirvana.pipeline.cli", "verify", str(folder))


def verify_here(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`nirvana verify` in this process: exit status and the problem lines."""
    try:
        cli(["verify", str(folder)])
    except SystemExit as exit_:  # sys.exit(message): status 1, the message on stderr
        return 1, [line.strip() for line in str(exit_.code).splitlines()[1:]]
    assert capsys.readouterr().out.count("\n") == 2  # the summary and the commit that made it
    return 0, []


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository in which the prune stage pruned a tiny model, as DVC would run it."""
    repo = tmp_path_factory.mktemp("repo")
    base = tiny_model_dir(repo / "outputs/base_model")
    random_plan(AutoModelForCausalLM.from_pretrained(base), seed=3).to_parquet(repo / "outputs/plan.parquet")
    (repo / "metrics").mkdir()
    (repo / "metrics/calibration.json").write_text(json.dumps(CALIBRATION))
    table = pd.DataFrame({"candidate": [0, 1, 2], "seed": [7, 8, 9], "kl": [0.5, 0.25, 0.75]})
    table.assign(selected=table.candidate == 1).to_parquet(repo / "outputs/calibration_candidates.parquet")
    PLANS.to_parquet(repo / "outputs/plan_candidates.parquet")
    lock = {
        "schema": "2.0",
        "stages": {"allocate_sparsity": {"cmd": "a", "outs": [{"md5": "1"}]}, "prune": {"cmd": "p"}},
    }
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock))
    for args in (
        ["init", "-q"],
        ["add", "dvc.lock"],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
    ):
        assert sh(repo, "git", *args).returncode == 0
    stage(repo, "prune", PARAMS, *prune_paths("outputs/pruned_model"))
    return repo


PARAMS = defaults(Params, gamma="auto", model=defaults(ModelParams, name_or_path=BASE))
PLANS = pd.DataFrame(
    {
        "method": ["nirvana", "nirvana"],
        "allocation": ["nirvana", "nirvana"],
        "gamma": [3.0, 6.0],
        "kl": [0.3, 0.2],
        "sparsity_realised": [0.2, 0.2],
        "selected": [False, True],
    }
)
"""allocate_sparsity's table of a `gamma: auto` run in which gamma 6 won (the fixture's plan is random)."""


def prune_paths(out: str) -> tuple[str, ...]:
    calibration = ("metrics/calibration.json", "outputs/calibration_candidates.parquet")
    plans = ("outputs/plan.parquet", "outputs/plan_candidates.parquet")
    return ("outputs/base_model", *plans, *calibration, out, "metrics/prune.json")


def test_pruned_card_records_provenance_and_verifies(repo: Path) -> None:
    pruned = repo / "outputs/pruned_model"
    meta = read_card(pruned)
    assert meta["base_model"] == BASE and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and "pruned" in meta["tags"]
    card, metrics = meta["nirvana"], json.loads((repo / "metrics/prune.json").read_text())
    assert card["stage"] == "prune" and card["base_model"]["name_or_path"] == BASE
    assert len(card["base_model"]["digest"]) == 16
    assert card["sparsity"] == {"requested": 0.2, "realised": metrics["sparsity_realised"]}
    assert card["params"] == {"dense": metrics["dense"], "pruned": metrics["pruned"]}
    assert (card["method"], card["gamma"], card["allocation_mode"], card["attention_granularity"]) == (
        "nirvana",
        6.0,
        "nirvana",
        "group",
    )
    assert card["plan_selection"]["gamma"] == "auto" and card["plan_selection"]["method"] == "nirvana"
    assert [(c["gamma"], c["kl"], c["selected"]) for c in card["plan_selection"]["choices"]] == [
        (3.0, 0.3, False),
        (6.0, 0.2, True),
    ]
    assert card["calibration"] == CALIBRATION | {"selected_candidate": 1, "seed": 8}
    assert card["layers"] == layer_units(AutoModelForCausalLM.from_pretrained(pruned))
    assert card["code"] == code_state("prune") and len(card["code"]["sha256"]) == 64
    assert {"stages/prune.py", "nirvana/deploy/card.py", "nirvana/method/surgery.py"} <= set(card["code"]["files"])
    assert card["dvc_lock"] == lock_state(repo / "dvc.lock", "prune") and card["dvc_lock"]["stages"] == [
        "allocate_sparsity"
    ]
    assert set(card["weights"]["files"]) == {"model.safetensors", "modeling_nirvana.py"}
    up = card["weights"]["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert up["dtype"] == "F32" and up["shape"] == [card["layers"][0]["mlp"], 24] and len(up["sha256"]) == 64
    text = (pruned / CARD).read_text()
    assert "## Per-layer widths" in text and "### Calibration selection" in text
    # measured only after the card is written: it says where the numbers are (the released folder's card)
    assert "## Results" in text and "`outputs/release/` (stage `publish`)" in text
    assert "### Plan selection" in text and "| nirvana | nirvana | 6.0 | 0.20000 | 0.2 | chosen |" in text
    done = verify(pruned)
    assert done.returncode == 0, done.stderr
    ok, provenance = done.stdout.splitlines()
    # one weight file and the modeling file: counted apart (a new user read "2 safetensors file(s)")
    assert "OK" in ok and ok.endswith("in 1 safetensors file(s) and 1 Python file(s) match"), done.stdout
    head = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()  # the commit of the lock the stage ran under
    assert provenance.endswith(f"made by the run committed in {head[:12]}: `git checkout {head[:12]}` to reproduce it")


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute [start, end) of a tensor's bytes in a safetensors file, from its header."""
    (size,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + size])
    start, end = header[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def test_one_flipped_byte_names_exactly_that_tensor(repo: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(repo / "outputs/pruned_model", tmp_path / "pruned")
    weights, name = folder / "model.safetensors", "model.layers.1.self_attn.k_proj.weight"
    start, end = tensor_span(weights, name)
    data = bytearray(weights.read_bytes())
    data[(start + end) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    done = verify(folder)
    assert done.returncode != 0 and done.stdout == ""
    lines = [line.strip() for line in done.stderr.splitlines()[1:]]
    assert lines == ["file model.safetensors: SHA-256 differs", f"tensor {name}: SHA-256 differs"]


def test_a_missing_shard_and_an_extra_file_are_named(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(repo / "outputs/pruned_model").save_pretrained(folder, max_shard_size="20KB")
    (folder / CARD).write_text(model_card(read_card(repo / "outputs/pruned_model")["nirvana"], folder, cwd=tmp_path))
    assert verify_folder(folder)[0]
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    tensors = read_card(folder)["nirvana"]["weights"]["tensors"]
    shard_tensors = {name for name, t in tensors.items() if t["file"] == shards[0].name}
    assert 0 < len(shard_tensors) < len(tensors)
    shards[0].unlink()
    shutil.copy(shards[1], folder / "extra.safetensors")
    code, lines = verify_here(folder, capsys)
    assert code != 0
    assert f"file {shards[0].name}: missing (in the card, not in the folder)" in lines
    assert "file extra.safetensors: extra (in the folder, not in the card)" in lines
    assert {line.split(":")[0].removeprefix("tensor ") for line in lines if line.startswith("tensor")} == shard_tensors


def test_an_edited_modeling_file_is_named(repo: Path, tmp_path: Path) -> None:
    """The file `trust_remote_code=True` would run is hashed like the weights."""
    folder = shutil.copytree(repo / "outputs/pruned_model", tmp_path / "pruned")
    assert "modeling_nirvana.py" in read_card(folder)["nirvana"]["weights"]["files"]
    with (folder / "modeling_nirvana.py").open("a") as handle:
        handle.write("import os  # injected\n")
    ok, message = verify_folder(folder)
    assert not ok and message.splitlines()[1:] == ["  file modeling_nirvana.py: SHA-256 differs"]


def test_a_folder_without_a_card_fails_clearly(repo: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(repo / "outputs/pruned_model", tmp_path / "pruned")
    (folder / CARD).unlink()
    ok, message = verify_folder(folder)
    assert not ok and "no readable model card" in message


def test_zero_step_finetune_writes_a_card_for_the_copy(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pd.DataFrame({"text": [random_text(40, seed) for seed in range(4)]}).to_parquet(repo / "corpus.parquet")
    paths = (
        "outputs/pruned_model",
        "corpus.parquet",
        "outputs/base_model",
        "outputs/finetuned_model",
        "metrics/finetune.json",
    )
    stage(repo, "finetune", defaults(Params, finetune=defaults(FinetuneParams, steps=0)), *paths)
    pruned, tuned = repo / "outputs/pruned_model", repo / "outputs/finetuned_model"
    for path in pruned.iterdir():
        assert path.name == CARD or (tuned / path.name).read_bytes() == path.read_bytes()
    before, after = read_card(pruned)["nirvana"], read_card(tuned)["nirvana"]
    assert after["stage"] == "finetune" and after["finetune"]["steps"] == 0
    assert after["base_model"] == before["base_model"] and after["layers"] == before["layers"]
    assert after["weights"] == before["weights"] and after["pruned_model"]["code"] == before["code"]
    assert "Skipped (`finetune.steps: 0`)" in (tuned / CARD).read_text()
    assert verify_here(tuned, capsys) == (0, [])


def test_tuned_card_of_a_pruned_folder_without_one_says_what_is_unknown(repo: Path, tmp_path: Path) -> None:
    pruned = shutil.copytree(repo / "outputs/pruned_model", tmp_path / "pruned")
    (pruned / CARD).unlink()
    model = AutoModelForCausalLM.from_pretrained(pruned)
    summary = {"steps": 3, "train_loss": 1.5}
    save_model(
        model,
        AutoTokenizer.from_pretrained(pruned),
        tmp_path / "tuned",
        card=partial(
            model_card, finetune_record(pruned, defaults(FinetuneParams, steps=3), summary, model), cwd=tmp_path
        ),
    )
    meta = read_card(tmp_path / "tuned")
    card = meta["nirvana"]
    assert "base_model" not in meta and {"lora", "fine-tuned"} <= set(meta["tags"])
    assert card["pruned_model"]["card"] is None and card["layers"] == layer_units(model)
    assert card["finetune"] == summary | {"params": dataclasses.asdict(defaults(FinetuneParams, steps=3))}
    assert card["code"] == code_state("finetune") and card["dvc_lock"]["sha256"] is None
    text = (tmp_path / "tuned" / CARD).read_text()
    assert "Unknown: the pruned model this was fine-tuned from had no model card" in text
    assert "| train_loss | 1.5 |" in text
    assert verify_folder(tmp_path / "tuned")[0]


def test_the_card_is_the_same_at_another_commit_and_time(repo: Path) -> None:
    """Nothing commit- or time-specific in a cached output: the same code, params and inputs give the same
    card byte for byte after a new commit (DVC would otherwise cache a new output hash each time)."""
    (repo / "unrelated.txt").write_text("a later commit")
    for args in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "later"]):
        assert sh(repo, "git", *args).returncode == 0
    stage(repo, "prune", PARAMS, *prune_paths("outputs/again"))
    assert (repo / "outputs/again" / CARD).read_bytes() == (repo / "outputs/pruned_model" / CARD).read_bytes()


def test_code_hash_follows_the_stage_code_only(tmp_path: Path) -> None:
    """The code hash covers exactly the code files dvc.yaml lists for the stage, by content."""
    for name in ("stages/s.py", "nirvana/a.py", "nirvana/models/m.py", "nirvana/unused.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    deps = ["stages/s.py", "nirvana/a.py", "nirvana/models", "outputs/x"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "c", "deps": deps}}}))
    first = code_state("s", tmp_path)
    assert set(first["files"]) == {"stages/s.py", "nirvana/a.py", "nirvana/models/m.py"}
    (tmp_path / "nirvana/unused.py").write_text("changed")
    assert code_state("s", tmp_path) == first
    (tmp_path / "nirvana/models/m.py").write_text("changed")
    assert code_state("s", tmp_path)["sha256"] != first["sha256"]
    assert code_state("other", tmp_path)["sha256"] is None


def test_lock_hash_covers_only_the_stages_upstream() -> None:
    """A stage's own (stale) lock entry and downstream ones change every run; they must not move the hash."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dvc.lock"
        entries = {"prepare_model": {"outs": [{"md5": "m"}]}, "prune": {"outs": [{"md5": "old"}]}}
        path.write_text(yaml.safe_dump({"stages": entries}))
        first = lock_state(path, "prune")
        entries["prune"]["outs"][0]["md5"] = "new"
        entries["evaluate@pruned"] = {"outs": []}
        path.write_text(yaml.safe_dump({"stages": entries}))
        assert lock_state(path, "prune") == first and first["stages"] == ["prepare_model"]
        assert lock_state(path, "finetune")["stages"] == ["prepare_model", "prune"]


def test_the_card_names_llm_pruners_band_of_pruned_layers() -> None:
    from nirvana.core.params import AllocationParams, Params
    from nirvana.deploy.card import allocation_label

    assert allocation_label(defaults(Params, method="taylor"), 30) == "llm_pruner (layers 4-27)"
    banded = defaults(Params, method="taylor", allocation=defaults(AllocationParams, band=[1, 3]))
    assert allocation_label(banded, 30) == "llm_pruner (layers 1-2)"
    assert allocation_label(defaults(Params, method="wanda_sp"), 30) == "uniform"


def test_the_lock_hash_of_a_card_leads_to_the_commit_that_made_it(tmp_path: Path) -> None:
    """The card's dvc.lock hash names the commit whose lock holds its upstream entries (item 7 of issue 25):
    the run's own commit first, then later ones that left those entries alone; a changed entry breaks it."""
    lock = lambda seed: {"stages": {name: {"cmd": f"{name} {seed}"} for name in ("prepare_model", "prune")}}  # noqa: E731
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    commits = []
    for text in (lock(1), lock(2), {**lock(2), "extra": 1}, lock(3)):
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump(text))
        git("add", "dvc.lock")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run")
        commits.append(git("rev-parse", "HEAD").stdout.strip())
    card = lock_state(tmp_path / "dvc.lock", "finetune")  # of the last run
    assert lock_commits(card, tmp_path) == [commits[3]]
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock(2)))
    assert lock_commits(lock_state(tmp_path / "dvc.lock", "finetune"), tmp_path) == commits[1:3]
    assert lock_commits(card, tmp_path.parent / "elsewhere") is None
    (tmp_path / "outputs/release").mkdir(parents=True)  # `nirvana verify` asks git from inside the model folder
    assert lock_commits(card, tmp_path / "outputs/release") == [commits[3]]


def test_a_missing_kl_or_gamma_reads_n_a_not_nan() -> None:
    """FLAP's allocation has no gamma and a plan without a search no KL: the card says n/a (a new user read `nan`)."""
    from nirvana.deploy.card import _selection

    flap = {"method": "flap", "allocation": "flap", "gamma": float("nan"), "kl": float("nan")}
    text = _selection(
        {"method": "flap", "gamma": "auto", "choices": [flap | {"sparsity_realised": 0.2, "selected": True}]}
    )
    assert "| flap | flap | n/a | n/a | 0.2 | chosen |" in text and "nan" not in text


def test_a_distilled_full_fine_tune_says_so_in_its_card(repo: Path, tmp_path: Path) -> None:
    """The card's title and tags name the recipe: every weight trained, distilled from the teacher, whose digest
    is recorded."""
    pruned = repo / "outputs/pruned_model"
    f = defaults(FinetuneParams, steps=3, adapter="full", loss="kd")
    summary = {"steps": 3, "loss": "kd", "adapter": "full", "teacher": "outputs/base_model", "teacher_digest": "ab"}
    text = model_card(finetune_record(pruned, f, summary, None), pruned, cwd=repo)
    assert "## Fine-tuning (every weight; distilled from the teacher)" in text
    assert "| teacher_digest | ab |" in text
    meta = card_data(finetune_record(pruned, f, summary, None)).to_dict()
    assert {"full-fine-tune", "distillation", "fine-tuned"} <= set(meta["tags"]) and "lora" not in meta["tags"]


LOAD_BY_CARD = """
import sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
folder, out = sys.argv[1:]
{setup}
model = {load}.eval()
with torch.no_grad():
    save_file({{"logits": model(input_ids=torch.arange(12).view(2, 6)).logits.contiguous()}}, out)
"""


def test_the_cards_loading_line_loads_the_pruned_folder(repo: Path, tmp_path: Path) -> None:
    """The card's own instructions, run as written in a fresh process (where nothing registered the pruned widths
    before them), give the model the pipeline pruned."""
    pruned = repo / "outputs/pruned_model"
    found = re.search(
        r"Load it with `([^`]+)` first .*?then `(AutoModelForCausalLM\.from_pretrained\(folder\))`",
        (pruned / CARD).read_text(),
    )
    assert found, "the card no longer says how to load the folder with nirvana"
    script = LOAD_BY_CARD.format(setup=found[1].replace("; ", "\n"), load=found[2])
    # the threads this process computes with now (a stage run in it pins its own): the same split, the same bits
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [sys.executable, "-c", script, str(pruned), str(tmp_path / "logits.safetensors")]
    done = subprocess.run(args, cwd=ROOT, env=os.environ | threads, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(pruned).eval()(input_ids=torch.arange(12).view(2, 6)).logits
    torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"], expected, atol=0, rtol=0)
