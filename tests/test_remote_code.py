"""Pruned folders load without nirvana: `trust_remote_code=True` builds the folder's own modeling file,
with the logits of the in-project load, in transformers and in lm-eval's command line; with nirvana
imported the stock class is still preferred, and the model card still verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from conftest import random_plan, save_tokenizer, tiny_decoder, tiny_llama, tiny_model_dir, tiny_t5
from nirvana.core.environment import PORTABLE
from nirvana.core.params import ModelParams, Params, defaults
from nirvana.deploy.card import model_card, prune_record
from nirvana.deploy.verify import verify_folder
from nirvana.evaluation.perplexity import param_counts
from nirvana.evaluation.zeroshot import render_tasks
from nirvana.method.surgery import layer_units, prune_model, save_model
from nirvana.models import GRANULARITY_KEY, remote
from nirvana.models.loading import load_tokenizer, skeleton
from nirvana.models.remote import MODELING_FILE, modeling_source
from nirvana.models.widths import BIAS_KEY, CONFIG_KEY

TOKENS = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(5))
CALIBRATION = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(2))
BLOCKER = '''
"""Make `import nirvana` fail in this interpreter, whatever is installed (the venv has it editable)."""
import sys


class _NoNirvana:
    def find_spec(self, name, path=None, target=None):
        if name == "nirvana" or name.startswith("nirvana."):
            raise ImportError(f"{name} is blocked: this process stands for a machine without nirvana")
        return None


sys.meta_path.insert(0, _NoNirvana())
'''
LOADER = '''
"""Load every folder named on the command line with trust_remote_code=True, save it again as a user
would (transformers copies the modeling file), reload that copy; save all logits in one file."""
import json, sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

try:
    import nirvana  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("nirvana is importable")
out, tokens = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
logits, classes = {}, {}
for index, folder in enumerate(sys.argv[3:]):
    seq2seq = "AutoModelForSeq2SeqLM" in json.load(open(f"{folder}/config.json"))["auto_map"]
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    extra = {"decoder_input_ids": tokens[:, :5]} if seq2seq else {}
    try:  # one broken folder must not hide the others' results
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits[folder] = model(input_ids=tokens, **extra).logits.contiguous()
        classes[folder] = type(model).__name__
        model.save_pretrained(f"{out}/resaved/{index}")
        again = auto.from_pretrained(f"{out}/resaved/{index}", trust_remote_code=True).eval()
        with torch.no_grad():
            logits[f"{folder}#resaved"] = again(input_ids=tokens, **extra).logits.contiguous()
    except Exception as err:
        classes[folder] = f"{type(err).__name__}: {err}"
    try:  # without remote code (and without nirvana) the stock class must refuse the pruned weights
        auto.from_pretrained(folder)
        classes[f"{folder}#stock"] = "loaded"
    except RuntimeError as err:
        classes[f"{folder}#stock"] = "refused" if "mismatch" in str(err) else repr(err)
assert not any(name == "nirvana" or name.startswith("nirvana.") for name in sys.modules)
save_file(logits, f"{out}/logits.safetensors", metadata=classes)
'''


class Remote(NamedTuple):
    """What the process without nirvana found for one folder."""

    cls: str  # the class it built, or the error
    logits: torch.Tensor | None
    resaved: torch.Tensor | None  # after save_pretrained and a second load


def flap_plan(model: PreTrainedModel, sparsity: float = 0.4) -> pd.DataFrame:
    """FLAP's plan: its `input_mean` column makes pruning compensate the output biases."""
    from nirvana.method.allocation import allocate_for_model
    from nirvana.method.criteria import flap_scores

    return allocate_for_model(model, flap_scores(model, CALIBRATION, 3), sparsity, 3.0, 1, "flap")


def llama_query_head() -> PreTrainedModel:
    model = tiny_llama("gqa", seed=1)
    setattr(model.config, GRANULARITY_KEY, "query_head")
    return model


CASES: dict[str, tuple[Callable[[], PreTrainedModel], Callable]] = {
    "llama_group": (lambda: tiny_llama("gqa"), partial(random_plan, seed=4)),
    "llama_query_head": (llama_query_head, partial(random_plan, seed=5, drop=0.5)),
    "llama_biases": (lambda: tiny_llama("gqa_bias"), partial(random_plan, seed=9)),  # q/k/v/gate/up biases
    # bias compensation gives o_proj and down_proj the biases the dense model lacks
    "llama_compensated": (lambda: tiny_llama("gqa", seed=2), partial(flap_plan, sparsity=0.3)),
    "mistral": (lambda: tiny_decoder("mistral", "group"), partial(random_plan, seed=2, drop=0.5)),
    "qwen2": (lambda: tiny_decoder("qwen2", "group"), flap_plan),
    "gemma3_text": (lambda: tiny_decoder("gemma3_text", "query_head"), partial(random_plan, seed=2, drop=0.5)),
    "t5": (lambda: tiny_t5("gated-gelu"), partial(random_plan, seed=3, drop=0.5)),
}


def forward(model: PreTrainedModel) -> torch.Tensor:
    extra = {"decoder_input_ids": TOKENS[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(input_ids=TOKENS, **extra).logits


def auto_for(folder: Path) -> type[AutoModelForCausalLM] | type[AutoModelForSeq2SeqLM]:
    seq2seq = json.loads((folder / "config.json").read_text()).get("is_encoder_decoder", False)
    return AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM


def without_nirvana(tmp: Path) -> dict[str, str]:
    """Environment of a process that cannot import nirvana and reads nothing from the network, computing on the
    CPU code paths (tests/conftest.py pins them) and threads this process runs, so that logits compare bit for bit."""
    site = tmp / "no_nirvana"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(tmp),
        "PYTHONPATH": str(site),
        "HF_HOME": str(tmp / "hf"),
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        **{key: os.environ[key] for key in PORTABLE if key in os.environ},
    }


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case pruned and saved with the pipeline's own save_model (tokenizer included)."""
    root = tmp_path_factory.mktemp("pruned")
    save_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    out = {}
    for name, (build, plan) in CASES.items():
        model = build()
        prune_model(model, plan(model))
        save_model(model, tokenizer, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def remote_logits(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Remote]:
    """Every folder loaded with trust_remote_code=True, and saved and reloaded, in one process without nirvana."""
    tmp = tmp_path_factory.mktemp("remote")
    (tmp / "load.py").write_text(LOADER)
    args = [str(tmp), json.dumps(TOKENS.tolist()), *map(str, folders.values())]
    done = subprocess.run(
        [sys.executable, str(tmp / "load.py"), *args], cwd=tmp, env=without_nirvana(tmp), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(tmp / "logits.safetensors"), framework="pt") as f:
        classes = f.metadata()
    logits = load_file(tmp / "logits.safetensors")
    refused = {name: classes[f"{folder}#stock"] for name, folder in folders.items()}
    assert set(refused.values()) == {"refused"}, refused
    return {
        name: Remote(classes[str(folder)], logits.get(str(folder)), logits.get(f"{folder}#resaved"))
        for name, folder in folders.items()
    }


def test_widths_are_uneven_and_the_extras_are_really_there(folders: dict[str, Path]) -> None:
    """The cases exercise what the modeling file must reproduce, not just a uniformly narrower model."""
    configs = {name: json.loads((folder / "config.json").read_text()) for name, folder in folders.items()}
    for name, config in configs.items():
        units = config[CONFIG_KEY]
        assert len({tuple(sorted(u.items())) for u in units}) > 1, name
    assert configs["llama_compensated"][BIAS_KEY] and configs["qwen2"][BIAS_KEY]
    assert configs["llama_query_head"][GRANULARITY_KEY] == configs["gemma3_text"][GRANULARITY_KEY] == "query_head"
    assert "cross" in configs["t5"][CONFIG_KEY][-1]


@pytest.mark.parametrize("name", sorted(CASES))
def test_folder_carries_the_modeling_file_and_auto_map(folders: dict[str, Path], name: str) -> None:
    folder = folders[name]
    assert (folder / MODELING_FILE).read_text() == modeling_source()
    config = json.loads((folder / "config.json").read_text())
    auto, cls = remote.CLASSES[config["model_type"]]
    assert config["auto_map"] == {auto: f"modeling_nirvana.{cls}"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loads_without_nirvana_with_the_in_project_logits(
    folders: dict[str, Path], remote_logits: dict[str, Remote], name: str
) -> None:
    found = remote_logits[name]
    assert found.cls.startswith("Nirvana") and found.logits is not None, found.cls
    local = auto_for(folders[name]).from_pretrained(folders[name]).eval()
    assert type(local).__module__.startswith("transformers.models.")  # nirvana's load: the stock class
    expected = forward(local)
    assert found.logits.shape == expected.shape
    torch.testing.assert_close(found.logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_copy_saved_without_nirvana_reloads_the_same(remote_logits: dict[str, Remote], name: str) -> None:
    """A user who fine-tunes without nirvana and saves gets a folder that loads again: transformers
    copies the modeling file and keeps auto_map."""
    found = remote_logits[name]
    assert found.logits is not None and found.resaved is not None, found.cls
    torch.testing.assert_close(found.resaved, found.logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["llama_compensated", "gemma3_text", "t5"])
def test_with_nirvana_imported_remote_code_gives_the_same_model(
    folders: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """nirvana's post_init hook runs inside the remote class too: shrinking twice must change nothing."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path))
    folder = folders[name]
    local = auto_for(folder).from_pretrained(folder).eval()
    loaded = auto_for(folder).from_pretrained(folder, trust_remote_code=True).eval()
    assert type(loaded).__name__.startswith("Nirvana") and type(loaded).__module__.startswith("transformers_modules")
    assert layer_units(loaded) == layer_units(local)
    assert loaded.state_dict().keys() == local.state_dict().keys()
    torch.testing.assert_close(forward(loaded), forward(local), atol=0, rtol=0)


def test_a_pruned_folder_loaded_and_saved_again_keeps_its_modeling_file(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """What finetune does (load a pruned folder, save the result) leaves a folder that loads without nirvana."""
    folder = folders["gemma3_text"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    save_model(model, AutoTokenizer.from_pretrained(folder), tmp_path / "again")
    assert (tmp_path / "again" / MODELING_FILE).read_bytes() == (folder / MODELING_FILE).read_bytes()
    before, after = (json.loads((f / "config.json").read_text()) for f in (folder, tmp_path / "again"))
    assert after["auto_map"] == before["auto_map"] and after[CONFIG_KEY] == before[CONFIG_KEY]


def test_dense_folder_gets_no_modeling_file(tmp_path: Path) -> None:
    save_tokenizer(tmp_path / "tokenizer")
    save_model(tiny_llama("gqa"), AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), tmp_path / "dense")
    assert not (tmp_path / "dense" / MODELING_FILE).exists()
    assert "auto_map" not in json.loads((tmp_path / "dense/config.json").read_text())


def recorded(cls: type, seen: list[tuple[str, object]]) -> Callable:
    """`cls.from_pretrained` that notes the trust_remote_code it was given."""
    load = cls.from_pretrained  # type: ignore[attr-defined]

    def record(*args: object, **kwargs: object) -> object:
        seen.append((cls.__name__, kwargs.get("trust_remote_code")))
        return load(*args, **kwargs)

    return record


@pytest.mark.parametrize("trust", [None, False, True], ids=["no params", "off", "on"])
def test_trust_remote_code_reaches_the_tokenizer_and_the_skeleton(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: bool | None
) -> None:
    """model.trust_remote_code goes to every load that could run a folder's own code, as it does to
    load_model's; without params it is the committed params.yaml's, off."""
    folder = tiny_model_dir(tmp_path / "model")
    seen: list[tuple[str, object]] = []
    for cls in (AutoConfig, AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", recorded(cls, seen))
    m = None if trust is None else defaults(ModelParams, trust_remote_code=trust)
    load_tokenizer(folder, m)
    skeleton(folder, m=m)
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer"}
    assert {flag for _, flag in seen} == {bool(trust)}


def test_keys_match_the_pipeline() -> None:
    """The modeling file cannot import nirvana, so it repeats the config keys: they must not drift."""
    from nirvana.models import modeling_nirvana

    assert (modeling_nirvana.UNITS_KEY, modeling_nirvana.BIAS_KEY) == remote.PRUNED_KEYS == (CONFIG_KEY, BIAS_KEY)
    assert modeling_nirvana.GRANULARITY_KEY == GRANULARITY_KEY


def test_card_verifies_a_folder_with_the_modeling_file(tmp_path: Path) -> None:
    base = tiny_model_dir(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    dense = param_counts(model)
    prune_model(model, random_plan(model, seed=3))
    metrics = {"dense": dense, "pruned": param_counts(model), "sparsity_realised": 0.3}
    record = prune_record(defaults(Params), base, model, metrics, None)
    save_model(model, AutoTokenizer.from_pretrained(base), tmp_path / "pruned", card=partial(model_card, record))
    assert (tmp_path / "pruned" / MODELING_FILE).is_file()
    ok, message = verify_folder(tmp_path / "pruned")
    assert ok, message


@pytest.mark.slow  # starts processes
def test_lm_eval_command_line_without_nirvana(folders: dict[str, Path], tmp_path: Path) -> None:
    """lm-eval's own CLI on one offline task, in a process that cannot import nirvana."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    render_tasks(tasks)
    command = [
        *(str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "hf"),
        *("--model_args", f"pretrained={folders['llama_group']},trust_remote_code=True,dtype=float32"),
        *("--tasks", "nirvana_arc_easy", "--include_path", str(tasks), "--limit", "4"),
        *("--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "results")),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=without_nirvana(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = (tmp_path / "results").rglob("results_*.json")
    scores = json.loads(result.read_text())["results"]["nirvana_arc_easy"]
    assert 0.0 <= scores["acc,none"] <= 1.0
    assert json.loads(result.read_text())["n-samples"]["nirvana_arc_easy"]["effective"] == 4
