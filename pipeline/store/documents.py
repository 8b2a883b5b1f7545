"""Bounded reading of the YAML documents the project reads: job specs, models specs, edit
settings files and `--set` values. Every one of them goes through `load_yaml`.

    load_yaml(text, where, max_bytes)              the parsed value; DocumentError if not
    read_yaml(uri, storage_options, max_bytes, what)   the same from a URI, read capped

Why a loader of our own and not `yaml.safe_load`: safe_load refuses code, not size. A
"billion laughs" document (nine anchors, each a list of nine aliases of the one before)
is a few hundred bytes that PyYAML composes into shared references cheaply; what comes
after it (a nested mapping flattened into dotted keys, a value quoted in an error, a spec
written to job.json) expands it to 9**9 leaves, gigabytes, before anything is said. No
file of this project needs an anchor or an alias, so the composer refuses both at the
first one, before any node is built from it; nesting is bounded too (each level is a
Python frame of the composer), and so is the text, before the parser sees a byte.
"""
from __future__ import annotations

from typing import Any, Mapping

import yaml

from pipeline.errors import MAX_ECHO, clip

from .storage import STORAGE_ERRORS, ReadRefused, StorageError, filesystem, read_bytes
from .uris import redact

MAX_SPEC_BYTES = 1 << 20        # a spec or settings file: a few KB in practice
MAX_DEPTH = 32                  # levels of nesting: a spec uses four at most

ALIASES_REFUSED = ("YAML anchors and aliases are not accepted (no file of maskface needs "
                   "one; write the value out)")


class DocumentError(ValueError):
    """A document that will not be read, its message naming it: too large, not YAML, an
    anchor or alias, nested too deep; or (`kind` set: FileNotFoundError,
    IsADirectoryError, PermissionError, ...) one the storage would not give."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


class _Refused(yaml.YAMLError):
    """Raised inside the composer; load_yaml turns it into a DocumentError."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses an anchor or an alias at its event (before any
    node is built from it, so a bomb never expands) and nesting past MAX_DEPTH."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        mark = event.start_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "a node"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(f"{at}: {ALIASES_REFUSED}")
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"{at}: nested deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _size(text: str | bytes, max_bytes: int) -> tuple[int, str]:
    """The size of `text` as the cap counts it, and its unit (a str longer in characters
    than the cap is over it in bytes too, and is not encoded to say so)."""
    if isinstance(text, bytes):
        return len(text), "bytes"
    if len(text) > max_bytes:
        return len(text), "characters"
    return len(text.encode("utf-8", "replace")), "bytes"


def load_yaml(text: str | bytes, where: str, max_bytes: int = MAX_SPEC_BYTES) -> Any:
    """The value of one YAML document (None when empty). DocumentError, its message
    starting with `where` (clipped), when the text is over `max_bytes`, holds an anchor
    or alias, nests past MAX_DEPTH or is not YAML; every quoted part is clipped."""
    where = clip(where)
    size, unit = _size(text, max_bytes)
    if size > max_bytes:
        raise DocumentError(f"{where}: {size:,} {unit}, over the limit of {max_bytes:,} "
                            "bytes: refused before parsing")
    try:
        return yaml.load(text, Loader=_BoundedLoader)       # noqa: S506 -- a SafeLoader
    except _Refused as e:
        raise DocumentError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise DocumentError(f"{where}: not valid YAML: {clip(str(e))}") from None
    except (ValueError, OverflowError, RecursionError) as e:
        # the constructors' own: an integer of over 4,300 digits, a date like 2024-02-30
        raise DocumentError(f"{where}: not valid YAML: {type(e).__name__}: "
                            f"{clip(str(e))}") from None


def read_yaml(uri: str, storage_options: Mapping | None = None,
              max_bytes: int = MAX_SPEC_BYTES, what: str = "document") -> Any:
    """The YAML document at `uri`, read through `read_bytes` (a file over `max_bytes` is
    refused from its size, before a byte is read) and parsed by `load_yaml`.
    DocumentError names it as `what` (`job spec`, `models spec`) and its URI, redacted
    and clipped: `kind` is set when the storage would not give it."""
    name = redact(uri, MAX_ECHO)
    try:
        data = read_bytes(uri, max_bytes, storage_options)
    except StorageError as e:
        raise _unreadable(what, name, e.kind, str(e)) from None
    except ReadRefused as e:
        if _is_folder(uri, storage_options):
            raise _unreadable(what, name, "IsADirectoryError", "is a directory") from None
        raise DocumentError(f"{what} {e}") from None
    except STORAGE_ERRORS as e:           # opening the filesystem itself
        raise _unreadable(what, name, type(e).__name__, redact(str(e))) from None
    return load_yaml(data, f"{what} {name}", max_bytes)


def _unreadable(what: str, name: str, kind: str, detail: str) -> DocumentError:
    if kind == "FileNotFoundError":
        return DocumentError(f"{what} not found: {name}", kind)
    return DocumentError(f"{what} {name} cannot be read ({kind}: {clip(detail)})", kind)


def _is_folder(uri: str, storage_options: Mapping | None) -> bool:
    """Whether a refused read was a folder (asked only then: it costs a request)."""
    try:
        fs, path = filesystem(uri, storage_options)
        return bool(fs.isdir(path))
    except STORAGE_ERRORS:
        return False
