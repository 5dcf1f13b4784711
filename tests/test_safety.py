"""No code path that runs arbitrary code from a file: no pickle, `torch.load` only with
`weights_only=True`, no `trust_remote_code=True` written into the code, and model folders hold
safetensors, never pickle-based weights (.bin/.pt/.pkl)."""

import ast
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import random_plan, save_tokenizer, tiny_llama
from nirvana.method.surgery import prune_model, save_model

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("nirvana", "stages", "benchmarks", "tests")
PICKLING = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_CALLS = {"read_pickle", "to_pickle"}  # pandas
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}


def sources() -> list[Path]:
    files = [f for folder in FOLDERS for f in sorted((ROOT / folder).rglob("*.py")) if "__pycache__" not in f.parts]
    assert len(files) > 40 and ROOT / "nirvana/core/io.py" in files
    return files


def dotted(node: ast.AST) -> str:
    """`torch.load` for the expression torch.load, "" for anything that is not a plain name chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(path: Path, root: Path = ROOT) -> list[str]:
    """Every unsafe construct in one file, as `path:line: what`."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in PICKLING:
            found.append(f"{where}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "torch.serialization.load") and not is_true(keywords.get("weights_only")):
                found.append(f"{where}: {name}( without weights_only=True")
            if name in ("torch.save", "torch.serialization.save"):
                found.append(f"{where}: {name}( (pickle format)")
            if name.rsplit(".", 1)[-1] in PICKLE_CALLS:
                found.append(f"{where}: {name}(")
            for key in ("trust_remote_code", "allow_pickle"):
                if is_true(keywords.get(key)):
                    found.append(f"{where}: {key}=True")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and is_true(value):
                    found.append(f"{where}: {{'trust_remote_code': True}}")
    return found


REMOTE_CODE_TEST = "tests/test_remote_code.py"
"""The one file allowed `trust_remote_code=True`: it checks that the modeling file save_model writes into a
pruned folder loads that way (nothing else is exempt, and the pipeline's own code never sets it)."""


def test_no_pickle_no_unsafe_torch_load_no_remote_code() -> None:
    problems = [problem for path in sources() for problem in findings(path)]
    problems = [
        p for p in problems if not (p.startswith(f"{REMOTE_CODE_TEST}:") and p.endswith("trust_remote_code=True"))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "code",
    [
        "import pickle\n",
        "from pickle import loads\n",
        "import joblib\n",
        "x = pickle.loads(b'')\n",
        "import torch\ntorch.load('w.pt')\n",
        "import torch\ntorch.load('w.pt', weights_only=False)\n",
        "import torch\ntorch.save({}, 'w.pt')\n",
        "import pandas as pd\npd.read_pickle('t.pkl')\n",
        "AutoModel.from_pretrained('x', trust_remote_code=True)\n",
        "kwargs = {'trust_remote_code': True}\n",
        "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n",
    ],
)
def test_the_scan_finds_each_unsafe_construct(tmp_path: Path, code: str) -> None:
    (tmp_path / "bad.py").write_text(code)
    assert findings(tmp_path / "bad.py", tmp_path)


def test_the_scan_accepts_the_safe_forms(tmp_path: Path) -> None:
    safe = (
        "import torch\n"
        "torch.load('w.pt', weights_only=True, map_location='cpu')\n"
        "AutoModel.from_pretrained('x', trust_remote_code=params.trust_remote_code)\n"
        "text = 'pickle.loads and trust_remote_code=True in a string are fine'\n"
    )
    (tmp_path / "ok.py").write_text(safe)
    assert findings(tmp_path / "ok.py", tmp_path) == []


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_saved_model_folders_hold_safetensors_only(tmp_path: Path, pruned: bool) -> None:
    """`save_model`, which every stage that writes a model uses, writes no pickle-based file."""
    model = tiny_llama("gqa")
    if pruned:
        prune_model(model, random_plan(model))
    save_tokenizer(tmp_path / "tokenizer")
    save_model(model, AutoTokenizer.from_pretrained(tmp_path / "tokenizer"), tmp_path / "model")
    names = sorted(p.name for p in (tmp_path / "model").rglob("*") if p.is_file())
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if Path(n).suffix in PICKLE_SUFFIXES], names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
