"""The software and hardware a stage computes on: the CPU kernels it pins, and what the records keep of them.

Float sums run in an order that depends on the code path torch, oneDNN and MKL pick for the CPU (AVX-512
on one machine, AVX2 on another) and on the number of threads. `cpu.kernels: portable` pins the paths to
AVX2 (x86-64-v3, which every supported x86-64 CPU runs) and `cpu.threads` fixes the thread count, so that
another CPU gives the same bits. `reproducible()` is what the results may depend on (the model cards and
metrics/environment.json hold it); `machine()` names the machine itself, for the timing files only."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

from nirvana.core.errors import InputError

# The three switches that fix the CPU code paths (read when torch first computes, not when it is imported).
PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
# The packages whose code computes the numbers the pipeline records.
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "peft",
    "lm_eval",
    "datasets",
    "numpy",
    "pandas",
    "pyarrow",
    "gguf",
    "llama_cpp_python",
)


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def pin_cpu(kernels: str, threads: int) -> None:
    """Fix the CPU code paths (portable: whatever the parent process set) and the thread count; stop if torch
    had already chosen its kernels, which happens only if something computed before this call."""
    if kernels == "portable" and is_x86():
        os.environ.update(PORTABLE)
        level = torch.backends.cpu.get_cpu_capability()
        if level != "AVX2":
            raise InputError(
                f"cpu.kernels = portable cannot hold: torch runs its {level} kernels, not AVX2 (this CPU lacks AVX2, "
                "or something computed before the pin); set cpu.kernels: native"
            )
    torch.set_num_threads(threads)


def kernels_in_force() -> dict[str, object]:
    """The CPU code paths and threads this process computes with."""
    pinned = is_x86() and all(os.environ.get(k) == v for k, v in PORTABLE.items())
    return {
        "kernels": "portable" if pinned else "native",
        "aten": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "AUTO"),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL"),
        "threads": torch.get_num_threads(),
    }


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def gpu() -> dict[str, object] | None:
    """The GPU the stage would use (the first one), with its driver; None on a CPU-only machine."""
    if not torch.cuda.is_available():
        return None
    driver = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.strip() or None
    return {"name": torch.cuda.get_device_name(0), "driver": driver, "cuda": torch.version.cuda}


def cpu_model() -> str:
    """The CPU's name as the kernel reports it (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """This machine: CPU model and cores, the best level torch would pick on it, the exact Python, the GPU."""
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": gpu(),
    }


def reproducible() -> dict[str, object]:
    """What the results depend on: Python (major.minor), the package versions, the kernels and threads in force,
    and the device. The CPU model joins only with native kernels (then the numbers depend on it); a GPU's
    name and driver always (GPU kernels are never bit-identical across models or drivers)."""
    record: dict[str, object] = {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "packages": package_versions(),
        "arch": platform.machine(),
        "cpu": kernels_in_force(),
        "gpu": gpu(),
    }
    if record["cpu"]["kernels"] == "native":  # type: ignore[index]
        record["cpu"] = {**record["cpu"], "model": cpu_model()}  # type: ignore[dict-item]
    return record


def describe(record: dict) -> str:
    """One line for a model card: where the numbers were computed."""
    cpu, gpu_ = record.get("cpu") or {}, record.get("gpu")
    if cpu.get("kernels") == "portable":
        where = f"{record.get('arch')} CPU, kernels pinned to {cpu.get('aten')} (MKL_CBWR {cpu.get('mkl_cbwr')})"
    else:
        where = f"{cpu.get('model', record.get('arch'))}, native kernels ({cpu.get('aten')})"
    where += f", {cpu.get('threads')} threads"
    if gpu_:
        where += f"; GPU {gpu_['name']} (driver {gpu_['driver']}, CUDA {gpu_['cuda']})"
    return where
