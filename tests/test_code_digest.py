"""The code digest in the resume keys of select_calibration and finetune follows the stage script and every nirvana
module the process has loaded, and nothing else."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from nirvana.core.io import code_digest


def test_the_code_digest_changes_with_the_script_and_with_a_loaded_nirvana_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, module, other = tmp_path / "stage.py", tmp_path / "probe.py", tmp_path / "other.py"
    script.write_text("x = 1\n")
    module.write_text("y = 1\n")
    other.write_text("z = 1\n")
    monkeypatch.setitem(sys.modules, "nirvana.probe", types.SimpleNamespace(__file__=str(module)))
    monkeypatch.setitem(sys.modules, "elsewhere", types.SimpleNamespace(__file__=str(other)))
    first = code_digest(script)
    assert code_digest(script) == first and len(first) == 16
    other.write_text("z = 2\n")  # not nirvana's code
    assert code_digest(script) == first
    module.write_text("y = 2\n")
    second = code_digest(script)
    assert second != first
    script.write_text("x = 2\n")
    assert code_digest(script) not in (first, second)
