"""`make gpu-check`'s first step: everything its GPU run needs, checked in a second or two,
before any model is built (GPU time is counted in minutes).

    python3 -m jobs.gpu_preflight        exit 0 when all is there, 1 naming what is not

It looks for the Python packages the GPU tests and the bench import (without importing
them, but torch, to ask for a CUDA device), the tools that build our CUDA kernels (nvcc,
a host C++ compiler, ninja, Python's headers) and make. A lent GPU machine may have
python3 with torch but not this project's venv: `make gpu-check` then runs with
`GPU_PY=python3`, and this says what that Python lacks.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

# What `make gpu-check` imports: the GPU tests (pytest, the project's models and engine)
# and `maskface bench` (its command line and the bench); triton for compiled runs.
MODULES = ("torch", "torchvision", "numpy", "yaml", "fsspec", "filelock", "tqdm", "PIL",
           "pytest", "setuptools", "triton")


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    found = shutil.which("nvcc") or str(Path(cuda_home) / "bin" / "nvcc")
    return found if Path(found).is_file() else None


def checks() -> list[tuple[str, str | None]]:
    """(what, where it was found or None) for every requirement, cheapest first."""
    out: list[tuple[str, str | None]] = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        out.append((f"python module {name}", spec.origin if spec else None))
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    out.append(("Python headers (Python.h)", str(headers) if headers.is_file() else None))
    out.append(("nvcc", _nvcc()))
    out.append(("host C++ compiler (c++ or g++)", shutil.which("c++") or shutil.which("g++")))
    out.append(("ninja", shutil.which("ninja")))
    out.append(("make", shutil.which("make")))
    device = None
    if importlib.util.find_spec("torch"):
        import torch
        if torch.cuda.is_available():
            device = f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    out.append(("a CUDA device torch can use", device))
    return out


def main() -> int:
    results = checks()
    for what, where in results:
        print(f"{'ok     ' if where else 'MISSING'}  {what}{f': {where}' if where else ''}")
    missing = [what for what, where in results if where is None]
    if missing:
        print(f"gpu-check: stopping before any model is built; missing: {', '.join(missing)} "
              f"(Python: {sys.executable})", file=sys.stderr)
        return 1
    print("gpu-check: everything the GPU run needs is here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
