"""No waste in start-up: `import nirvana` loads neither torch nor transformers, a stage that builds no model
never imports transformers' modeling code (seconds on 2 cores), and the pipeline's loader still loads a pruned
folder in a fresh process, where nothing registered the pruned widths before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import random_plan, save_tokenizer, tiny_llama
from nirvana.method.surgery import prune_model, save_model

pytestmark = pytest.mark.slow  # each test starts fresh interpreters, which is what it measures

ROOT = Path(__file__).resolve().parents[1]
MODELING = "transformers.modeling_utils"
TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))

STARTUP = """
import json, runpy, sys
runpy.run_path(sys.argv[1], run_name="startup")  # the imports, not the __main__ block
from nirvana.core.stage import run_stage
sys.argv = [sys.argv[1], "unused"]
run_stage("startup", lambda params, path: None)  # run_stage's own set-up: logging, params.yaml, the CPU pin
print(json.dumps(sorted(sys.modules)))
"""

LOAD = """
import sys
import torch
from safetensors.torch import save_file
folder, how, out = sys.argv[1:]
tokens = torch.tensor({tokens})
if how == "pipeline":
    from nirvana.models.loading import load_model
    model = load_model(folder, on="cpu")
else:
    import nirvana
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
with torch.no_grad():
    save_file({{"logits": model(input_ids=tokens).logits.contiguous()}}, out)
"""


def python(*args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter in the repository root, computing on one thread."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def loaded_at_startup(stage: str) -> set[str]:
    """The modules a stage script has imported once run_stage is set up, before its body would run."""
    done = python("-c", STARTUP, f"stages/{stage}.py")
    assert done.returncode == 0, done.stderr[-3000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_import_nirvana_loads_neither_torch_nor_transformers() -> None:
    code = "import json, sys, nirvana; print(json.dumps(sorted(sys.modules)))"
    done = python("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    heavy = [m for m in json.loads(done.stdout) if m.partition(".")[0] in ("torch", "transformers", "pandas")]
    assert heavy == [], heavy[:5]


@pytest.mark.parametrize(
    ("stage", "builds_a_model"), [("check_params", False), ("prepare_data", False), ("prune", True)]
)
def test_only_stages_that_build_a_model_import_transformers_modeling_code(stage: str, builds_a_model: bool) -> None:
    """check_params and prepare_data build no model, so transformers' modeling code (2.5 s or more) is waste
    there; prune builds one, which shows that the probe sees the module when it is loaded."""
    assert (MODELING in loaded_at_startup(stage)) is builds_a_model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A pruned tiny Llama saved as the pipeline saves it, and its logits on TOKENS before saving."""
    folder = tmp_path_factory.mktemp("startup")
    model = tiny_llama("gqa", seed=4)
    prune_model(model, random_plan(model, seed=4, drop=0.5))
    save_tokenizer(folder / "tokenizer")
    save_model(model, AutoTokenizer.from_pretrained(folder / "tokenizer"), folder / "pruned")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fresh process computes (`python`): the same bits need the same split
    try:
        with torch.no_grad():
            return folder / "pruned", model(input_ids=TOKENS).logits
    finally:
        torch.set_num_threads(threads)


def load_fresh(folder: Path, how: str, out: Path) -> subprocess.CompletedProcess[str]:
    """Load `folder` in a fresh process (`pipeline`: nirvana.models.loading.load_model; `import`: `import nirvana`, then
    transformers' from_pretrained) and save its logits."""
    return python("-c", LOAD.format(tokens=TOKENS.tolist()), str(folder), how, str(out))


def test_the_pipelines_loader_loads_a_pruned_folder_in_a_fresh_process(
    pruned: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    """load_model registers the pruned widths itself (the card's one-liner for users: tests/test_card.py)."""
    folder, expected = pruned
    done = load_fresh(folder, "pipeline", tmp_path / "logits.safetensors")
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"], expected, atol=0, rtol=0)


def test_importing_nirvana_alone_does_not_teach_transformers_the_pruned_widths(
    pruned: tuple[Path, torch.Tensor], tmp_path: Path
) -> None:
    """Why the model card says `nirvana.register()`: without it the stock class refuses the pruned weights."""
    done = load_fresh(pruned[0], "import", tmp_path / "logits.safetensors")
    assert done.returncode != 0 and "mismatch" in done.stderr, done.stderr[-3000:]
