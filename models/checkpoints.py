"""Checkpoint files: fetch into a node-local cache, verify, load safely, check keys.

Every load goes through `torch.load(..., weights_only=True)`; the only Python type we
allow besides tensors and containers is the one a file format needs (e4e's options).
Each failure raises `CheckpointError` naming the file and what is wrong with it: a
`SetupError`, since no row of a job can run without its weights.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from filelock import FileLock

from pipeline.errors import SetupError, clip_message
from pipeline.store.storage import filesystem, replaced_atomically
from pipeline.store.uris import is_local, redact

if TYPE_CHECKING:       # torch is imported where a checkpoint is loaded: URI helpers stay light
    import torch

log = logging.getLogger(__name__)


class CheckpointError(SetupError):
    """A checkpoint file is missing, corrupt, unsafe, or does not fit its network.

    The message is one line of at most MAX_MESSAGE characters (newlines in a library's
    message folded, the tail cut): it is what a job prints when it refuses its weights,
    and a crafted file must not make it a page long."""

    def __init__(self, message: object = ""):
        super().__init__(clip_message(" ".join(str(message).split())))


def cache_dir() -> Path:
    """Node-local cache: $MASKFACE_CACHE, else $XDG_CACHE_HOME/maskface, else ~/.cache/maskface."""
    root = os.environ.get("MASKFACE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskface"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def local_file(uri: str, sha256: str | None = None, storage_options: Mapping | None = None
               ) -> Path:
    """A local path holding the bytes of `uri`, verified against `sha256` when given.

    Local paths are used in place. Any other fsspec URI is copied once into the
    node-local cache (under a lock, written to a temporary name and renamed), so
    several processes on one node share a single download.
    """
    name = redact(uri)
    if is_local(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{name}: file not found")
        if sha256:
            _verify(path, sha256, name)
        return path

    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache_dir() / "files" / key / Path(uri.split("?")[0]).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and sha256 and sha256_file(dest) != sha256.lower():
            log.warning("cached copy of %s does not match its sha256; fetching again", name)
            dest.unlink()
        if not dest.is_file():
            log.info("copying %s into the node cache %s", name, dest)
            with replaced_atomically(dest) as tmp:
                _copy_into(uri, tmp, name, storage_options)
                if sha256:
                    _verify(tmp, sha256, name)
    return dest


def _copy_into(uri: str, tmp: Path, name: str, storage_options: Mapping | None) -> None:
    """The bytes of `uri` into the local file `tmp`, through the storage layer (its retry
    policy); CheckpointError when they cannot be had."""
    try:
        fs, path = filesystem(uri, storage_options)
        fs.get_file(path, str(tmp))
    except FileNotFoundError:
        raise CheckpointError(f"{name}: file not found") from None
    except Exception as e:
        raise CheckpointError(f"{name}: could not copy into the node cache: "
                              f"{type(e).__name__}: {redact(str(e))}") from None


def _verify(path: Path, expected: str, uri: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise CheckpointError(f"{uri}: sha256 mismatch: expected {expected.lower()}, got {actual}")


def safe_load(path: str | os.PathLike, uri: str | None = None,
              allowed_types: Iterable[type] = (), shapes_only: bool = False) -> object:
    """torch.load with weights_only=True onto the CPU, with errors that name the file.

    `shapes_only`: the tensors come back on the meta device (shapes and dtypes, none of
    their bytes read: a check of a 380 MB generator's keys costs no memory) when each
    is seen to have exactly its bytes in the file. Any other file (PyTorch's legacy
    format, as torchvision's VGG16 of 2017 is; another byte order; a record cut short or
    padded; a zip Python cannot read) is read whole, as the loaders read it: both refuse
    and accept the same files, with the same message."""
    name = redact(uri or str(path))
    if not (shapes_only and _meta_loadable(path)):
        return _torch_load(path, name, allowed_types, "cpu")
    loaded = _torch_load(path, name, allowed_types, "meta")
    if _records_fit(path, loaded):
        return loaded
    return _torch_load(path, name, allowed_types, "cpu")    # torch's own verdict, the loaders'


def _torch_load(path: str | os.PathLike, name: str, allowed_types: Iterable[type],
                location: str) -> object:
    """torch.load, weights only, onto `location`; its failures as CheckpointError."""
    import torch
    try:
        with torch.serialization.safe_globals(list(allowed_types)):
            return torch.load(path, map_location=location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: file not found") from None
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            found = re.search(r"GLOBAL ([\w.]+)|global ([\w.]+)", msg)
            what = next((g for g in found.groups() if g), "an object") if found else "an object"
            hint = ("; it is an NVIDIA network pickle: convert it with `maskface weights "
                    "convert` and name the .pt" if what.startswith("dnnlib.") else "")
            raise CheckpointError(
                f"{name}: refused to load: the file contains {what}, which is outside the "
                "safe allowlist (a checkpoint should hold only tensors; loading it fully "
                f"could run code){hint}") from None
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({msg})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{name}: not a readable PyTorch checkpoint (truncated, corrupt or another "
            f"format): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _meta_loadable(path: str | os.PathLike) -> bool:
    """Whether torch can load `path` onto the meta device as safely as onto the CPU: its
    zip format (by torch's own test, the first bytes), in this machine's byte order
    (torch would byteswap a meta storage's absent bytes: a crash, seen in torch 2.14).
    Anything else, or a zip Python cannot read, is read whole instead, as the loaders do."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False
        with zipfile.ZipFile(path) as z:
            orders = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == "byteorder"]
            return all(z.read(n) == sys.byteorder.encode() for n in orders)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def _records_fit(path: str | os.PathLike, loaded: object) -> bool:
    """Whether each tensor of a meta load has exactly its bytes in the file: one record
    of the zip, where torch placed it, as long as its storage. Reading the bytes checks
    this (a record cut short or padded is refused); a meta load reads none. False also
    when torch noted no offset to check by, or Python cannot read the zip: the caller
    then reads the file whole, and torch decides as it does for the loaders."""
    import torch
    try:
        sizes = _record_sizes(path)
    except (OSError, zipfile.BadZipFile, struct.error, EOFError, ValueError):
        return False
    todo, seen = [loaded], set()
    while todo:                 # iterative: a file's nesting must not overflow the stack
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            offset = getattr(storage, "_checkpoint_offset", None)
            if offset is None or sizes.get(offset) != storage.nbytes():
                return False
        elif isinstance(item, Mapping):
            todo.extend([*item.keys(), *item.values()])
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
        elif hasattr(item, "__dict__"):      # e4e's options (argparse.Namespace)
            todo.extend(vars(item).values())
    return True


def _record_sizes(path: str | os.PathLike) -> dict[int, int]:
    """The zip's records: where each one's bytes start in the file -> how many (a local
    header is 30 bytes, then the name and the extra field, whose lengths it gives)."""
    sizes = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            sizes[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return sizes


def require_mapping(obj: object, name: str, keys: Iterable[str] = ()) -> Mapping:
    """Check that a loaded checkpoint is a dict holding `keys`."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a dict, found {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CheckpointError(f"{name}: missing top-level key(s) {missing}; "
                              f"found {sorted(map(str, obj))[:10]}")
    return obj


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], name: str
                ) -> None:
    """Load a state dict whose keys and shapes must match the module's exactly."""
    check_fits(module, state_dict, name)
    module.load_state_dict(state_dict, strict=True)


def check_fits(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], name: str
               ) -> None:
    """CheckpointError unless the state dict has exactly the module's keys and shapes.
    Reads shapes only, so `module` may live on the meta device (a preflight's)."""
    import torch
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
             for k, v in state_dict.items()
             if k in expected and (not isinstance(v, torch.Tensor) or v.shape != expected[k].shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", extra),
                         ("wrong shapes", wrong)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{name}: does not fit {type(module).__name__}: " + "; ".join(problems))
