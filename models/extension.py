"""Our compiled ops (models/csrc), built on first use with torch.utils.cpp_extension.

    ops = load_ops("cuda")    # the CUDA kernels, or None (then callers use the reference)
    ops = load_ops("cpu")     # the CPU twin of the same arithmetic, for tests

A build goes into a cache folder keyed by a hash of the sources, the torch version,
the kind and the CUDA architectures, so it happens once per node and version. It is
made under a temporary name and renamed into place: processes that build at the same
time never load half a build. A build that fails logs one warning and returns None.

Compiling the CUDA kernels needs nvcc and ninja. Without a visible GPU set
TORCH_CUDA_ARCH_LIST (e.g. 9.0); CUDA_HOME defaults to /usr/local/cuda when that holds
nvcc, since an nvcc wrapper elsewhere on PATH makes torch guess the wrong root.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path
from types import ModuleType

import torch

from .checkpoints import cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = {"cuda": ("ops.cu", "bindings.cpp"), "cpu": ("cpu_twin.cpp", "bindings.cpp")}
HEADERS = ("kernels.h",)
FLAGS = {"cflags": ["-O3"], "cuda_cflags": ["-O3"]}
_loaded: dict[tuple, ModuleType | None] = {}


def build_dir() -> Path:
    """$MASKFACE_EXT_CACHE, else the node cache's ext/ folder."""
    env = os.environ.get("MASKFACE_EXT_CACHE")
    return Path(env) if env else cache_dir() / "ext"


def cuda_arch() -> str:
    """The architectures to build for: TORCH_CUDA_ARCH_LIST, else the visible GPU's."""
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return listed
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    raise RuntimeError("no GPU visible and TORCH_CUDA_ARCH_LIST unset: say which CUDA "
                       "architectures to build for, e.g. TORCH_CUDA_ARCH_LIST=9.0")


def build_key(kind: str, arch: str = "") -> str:
    h = hashlib.sha256()
    for name in SOURCES[kind] + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    h.update(f"{torch.__version__}|{kind}|{arch}|{FLAGS}".encode())
    return h.hexdigest()[:16]


def _set_cuda_home() -> None:
    from torch.utils import cpp_extension
    if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if os.environ.get("CUDA_HOME"):
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]   # read when the module was imported


def _import(name: str, folder: Path) -> ModuleType:
    path = next(folder.glob(f"{name}*.so"))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(kind: str) -> ModuleType:
    """Build (or find in the cache) and import the ops of `kind`; raises on failure."""
    from torch.utils import cpp_extension
    arch = ""
    if kind == "cuda":
        arch = cuda_arch()
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        _set_cuda_home()
    name = f"maskface_{kind}_ops_{build_key(kind, arch)}"
    final = build_dir() / name
    if final.is_dir() and any(final.glob(f"{name}*.so")):
        return _import(name, final)
    tmp = build_dir() / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        log.info("building %s ops into %s (once per node and version)", kind, final)
        module = cpp_extension.load(
            name=name, sources=[str(CSRC / s) for s in SOURCES[kind]], build_directory=str(tmp),
            extra_cflags=FLAGS["cflags"], extra_cuda_cflags=FLAGS["cuda_cflags"],
            extra_include_paths=[str(CSRC)], verbose=False)
        try:
            tmp.rename(final)
        except OSError:            # another process finished first: its build is the same
            shutil.rmtree(tmp, ignore_errors=True)
        return module
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_ops(kind: str = "cuda") -> ModuleType | None:
    """The compiled ops, or None with one warning when they cannot be built here."""
    key = (kind, build_dir())
    if key not in _loaded:
        try:
            _loaded[key] = build(kind)
        except Exception as e:          # a compiler error is many lines: keep the last
            last = str(e).strip().splitlines()[-1:] or [type(e).__name__]
            log.warning("maskface %s ops unavailable, using the PyTorch reference: %s",
                        kind, last[0])
            _loaded[key] = None
    return _loaded[key]
