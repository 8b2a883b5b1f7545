"""What a job may read: the `inputs` section of a job spec.

A manifest's URIs are data, not instructions: manifests are often built from files that
somebody else collected, so an `image_uri` (or `source_uri`) must not make a worker read
whatever it names. Every input URI is checked here, in the actor, before any request:

    inputs:
      allow: [s3://data/celeba/, /mnt/photos/, https://images.example.com/faces/]

Each entry is a folder: a local directory, an `s3://bucket/prefix/`, or an
`http(s)://host[:port]/path/`. A URI is allowed when it lies inside one (whole path
segments: `/data/a` does not allow `/data/ab`). Local paths are compared after resolving
`..` and symlinks; URIs with `..` segments, chained protocols (`a::b`) or credentials
in them are refused outright.

Without `inputs.allow` (DEFAULT_RULE): local files and `s3://` objects are allowed, except
hidden files, hidden folders of a home directory (`~/.aws`, `~/.ray`, `~/.ssh`, ...) and
the system's folders (SYSTEM_DIRS); no other protocol, and so no `http(s)://` host, is
ever allowed unless listed. List `inputs.allow` for any manifest you did not build.

The same section holds the limits every image read obeys (pipeline/output/images.py):
`max_bytes`, `max_pixels`, `min_side`, and `square` (how a non-square image is made
square: `crop` its centre, or `stretch` it as the original MaskFaceGAN does).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlsplit

from pipeline.store.uris import redact
from pipeline.errors import InputRefused
from pipeline.output.images import SQUARE, ImageLimits

DEFAULT_RULE = ("local files but hidden ones, those in a home's hidden folders and in system "
                "folders, and s3:// objects")
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/run", "/boot", "/var/run", "/var/lib",
               "/var/log")
LOCAL = ("file", "local")


@dataclass(frozen=True, kw_only=True)
class InputPolicy(ImageLimits):
    """Where inputs may come from (`allow`, see the module doc), and the limits on each
    image (ImageLimits: pipeline/output/images.py)."""
    allow: tuple[str, ...] | None = field(default=None, metadata={"help": (
        "the URI prefixes (local folders, `s3://bucket/prefix/`, `http(s)://host:port/path/`) "
        "the job may read images from; anything else is a row error before any request. "
        "Unset: " + DEFAULT_RULE)})

    @classmethod
    def from_spec(cls, data: Mapping[str, Any] | None) -> "InputPolicy":
        """From a job spec's `inputs` mapping; unknown keys and bad values raise ValueError."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"inputs: unknown key(s) {unknown}; known: {sorted(known)}")
        allow = data.get("allow")
        if allow is not None:
            if isinstance(allow, str):
                allow = [allow]
            if not isinstance(allow, (list, tuple)) or not all(
                    isinstance(a, str) and a.strip() for a in allow):
                raise ValueError(f"inputs.allow must be a list of URI prefixes, got {allow!r}")
            for entry in allow:
                _location(entry)                  # refuses a malformed entry now
            data["allow"] = tuple(allow)
        for key in ("max_bytes", "max_pixels", "min_side"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"inputs.{key} must be a positive integer, got {value!r}")
        if data.get("square", "crop") not in SQUARE:
            raise ValueError(f"inputs.square must be one of {', '.join(SQUARE)}, "
                             f"got {data['square']!r}")
        return cls(**data)

    def check(self, uri: str) -> None:
        """Raise InputRefused unless this job may read `uri`. Makes no request."""
        try:
            where = _location(uri)
        except ValueError as e:
            raise InputRefused(f"{redact(uri)}: refused: {e}") from None
        if self.allow is None:
            problem = _default_problem(where)
            if problem:
                raise InputRefused(f"{redact(uri)}: refused: {problem} (the default rule "
                                   f"allows {DEFAULT_RULE}; list it in inputs.allow)")
            return
        if not any(_inside(where, _location(entry)) for entry in self.allow):
            raise InputRefused(f"{redact(uri)}: refused: not under any inputs.allow "
                               f"prefix ({', '.join(self.allow)})")


def manifest_home(manifest_uri: str) -> str:
    """Where a manifest's own inputs are expected: its folder (the manifest itself when it
    is a folder of Parquet files) on local disk, its bucket on an object store."""
    protocol, host, path = _location(manifest_uri)
    if protocol != "file":
        return f"{protocol}://{host}/"
    folder = "/" + "/".join(path)
    return folder if os.path.isdir(folder) else os.path.dirname(folder)


def outside_of(home: str, uris: Iterable[str]) -> set[str]:
    """The URIs that lie outside `home` (`manifest_home`'s answer), after `..` and
    symlinks are resolved; a URI that cannot be parsed counts as outside."""
    where = _location(home)
    protocol, host, path = where
    if protocol != "file":
        where = (protocol, host, ())                 # the whole bucket
    outside = set()
    for uri in set(uris):
        try:
            if not _inside(_location(uri), where):
                outside.add(uri)
        except ValueError:
            outside.add(uri)
    return outside

# -- a URI as (protocol, host, path segments) --------------------------------------------
def _location(uri: str) -> tuple[str, str, tuple[str, ...]]:
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("an empty URI")
    if "::" in uri:
        raise ValueError("chained protocols (a::b) are not accepted")
    if "\x00" in uri:
        raise ValueError("a NUL character in the URI")
    protocol, sep, rest = uri.partition("://")
    if not sep:
        if uri.startswith("data:"):
            raise ValueError("data: URIs are not accepted")
        return "file", "", _local_segments(uri)
    protocol = protocol.lower()
    if protocol in LOCAL:
        return "file", "", _local_segments(rest)
    if protocol in ("http", "https"):
        return _http_location(uri)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {protocol}:// URI")
    return protocol, bucket, _segments(key.split("?")[0])


def _local_segments(path: str) -> tuple[str, ...]:
    path = os.path.realpath(os.path.expanduser(path))
    return tuple(s for s in path.split("/") if s)


def _segments(path: str) -> tuple[str, ...]:
    parts = tuple(s for s in unquote(path).split("/") if s)
    if any(s in (".", "..") for s in parts):
        raise ValueError("'.' or '..' path segments are not accepted")
    return parts


def _http_location(uri: str) -> tuple[str, str, tuple[str, ...]]:
    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("credentials in an http(s) URI are not accepted")
    if not parts.hostname:
        raise ValueError("no host in the URI")
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, f"{parts.hostname.lower()}:{port}", _segments(parts.path)


def _inside(where: tuple, prefix: tuple) -> bool:
    (protocol, host, path), (p_protocol, p_host, p_path) = where, prefix
    return (protocol, host) == (p_protocol, p_host) and path[:len(p_path)] == p_path


def _default_problem(where: tuple) -> str | None:
    protocol, _, path = where
    if protocol == "s3":
        return None
    if protocol != "file":
        return f"{protocol}:// inputs must be listed in inputs.allow"
    full = "/" + "/".join(path)
    if any(full == d or full.startswith(d + "/") for d in SYSTEM_DIRS):
        return "a path inside a system folder"
    if path and path[-1].startswith("."):
        return "a hidden file"
    for home in _homes():
        inside = full[len(home) + 1:] if full.startswith(home + "/") else ""
        if inside.startswith("."):
            return "a path inside a hidden folder of a home directory"
    return None


def _homes() -> set[str]:
    homes = {os.path.realpath(os.path.expanduser("~")), "/root"}
    if os.path.isdir("/home"):
        homes.update(f"/home/{name}" for name in os.listdir("/home"))
    return homes
