"""The names of stored things: URIs fit for a log, resolved against a base or kept under
a root; and the dotted keys of nested options (`a.b.c`), which the storage options'
credential check and the edit settings both read."""
from __future__ import annotations

import posixpath
import re
from typing import Any, Mapping

from pipeline.errors import clip


# The longest text the patterns below run on: their cost grows with the square of a
# hostile text's length (a 16 KB one takes half a second, a 5 MB one hours).
REDACT_LIMIT = 4096
_SEPARATORS = "/@'\""        # with whitespace: no credential or its user part holds one


def redact(text: str, limit: int = REDACT_LIMIT) -> str:
    """Text fit for logs and errors: URL credentials (user:password@), the same pair where
    a library's message quotes a URI's parts without its scheme, and query strings
    (signed URLs, tokens) replaced by ***. Text over `limit` characters is cut first, as
    pipeline.errors.clip cuts it (`...` and the full length said), but back to the last
    separator before the limit, so a credential is never cut in half and left unseen:
    errors pass limit=MAX_ECHO."""
    if len(text) <= limit:
        return _redacted(text)
    keep = limit
    while keep and not (text[keep - 1].isspace() or text[keep - 1] in _SEPARATORS):
        keep -= 1
    return f"{_redacted(text[:keep])}... ({len(text):,} characters)"


def _redacted(text: str) -> str:
    text = re.sub(r"(://)[^/@\s'\"]+@", r"\1***@", text)
    text = re.sub(r"(^|[\s'\"(=])[^\s/@'\":]+:[^\s/@'\"]+@", r"\1***@", text)
    return re.sub(r"\?[^\s'\"]*", "?***", text)


def resolve_uri(uri: str, base: str | None) -> str:
    """A URI relative to the file `base` names (a spec's or a manifest's own URI): paths
    are joined to base's folder; URLs, absolute and home (~) paths are kept as given."""
    if base is None or "://" in uri or uri.startswith(("/", "~")):
        return uri
    return posixpath.join(posixpath.dirname(base), uri)


def is_local(uri: str) -> bool:
    """A path or a file:// URI (not an object store, not a URL)."""
    return "://" not in uri or uri.startswith("file://")


def under(root: str, rel: str) -> str:
    """`root/rel` for a key under a root; a `rel` that could leave `root` (absolute,
    empty segments, `.` or `..`, backslashes) raises ValueError."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise ValueError(f"output path {clip(repr(rel))} would leave the output folder")
    return posixpath.join(root, rel)


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'steps': {'latent': 5}, 'loss.weights.seg': 0} -> {'steps.latent': 5,
    'loss.weights.seg': 0}: dotted keys are kept, an empty mapping leaves no key."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out
