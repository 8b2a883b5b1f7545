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

Without `inputs.allow` (DEFAULT_RULE) a job reads only under the manifest's own folder
and the folders the manifest records it was built from (INPUT_ROOTS_KEY: the builders
write it, `recorded_roots` reads it), local folders or `s3://` prefixes, and even there
never a hidden file, a home's hidden folder (`~/.aws`, `~/.ray`, `~/.ssh`, ...) or a
system folder (SYSTEM_DIRS). So the layouts our builders make run as they are, and a
symlink, `..`, an absolute path or a `file://` URI out of them fails its own row. The
driver makes these folders explicit once (`for_manifest`) and the actors check against
them. No other protocol, and so no `http(s)://` host, is ever read unless listed.

`inputs.allow: [any]` opts out: any local file or `s3://` object but those same hidden and
system ones (the rule before the manifest's folders confined it), with a warning in the
job's log. Other entries beside `any` are read as prefixes (an `https://` host, say).

The same section holds the limits every image read obeys (pipeline/output/images.py):
`max_bytes`, `max_pixels`, `min_side`, and `square` (how a non-square image is made
square: `crop` its centre, or `stretch` it as the original MaskFaceGAN does).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterable, Mapping
from urllib.parse import unquote, urlsplit

import pyarrow as pa

from pipeline.store.uris import redact
from pipeline.errors import InputRefused, SetupError
from pipeline.output.images import SQUARE, ImageLimits

log = logging.getLogger(__name__)

DEFAULT_RULE = ("only files under the manifest's folder and the folders it records it was "
                "built from (local folders, `s3://` prefixes), never hidden files, a home's "
                "hidden folders or system folders")
ANY = "any"
ANY_RULE = ("any local file but hidden ones, those in a home's hidden folders and in system "
            "folders, and any s3:// object")
SYSTEM_DIRS = ("/proc", "/sys", "/dev", "/etc", "/run", "/boot", "/var/run", "/var/lib",
               "/var/log")
LOCAL = ("file", "local")
DEFAULT_PROTOCOLS = ("file", "s3")    # what the default rule and `[any]` may read at all
# The manifest's Parquet metadata key under which a builder records the folders it read
# from: a JSON list of folder URIs (local folders resolved, `s3://bucket/prefix/`).
INPUT_ROOTS_KEY = b"maskface.input_roots"
SHOWN_ROOTS = 5                       # roots a refusal names before it counts the rest
Location = tuple[str, str, tuple[str, ...]]


@dataclass(frozen=True, kw_only=True)
class InputPolicy(ImageLimits):
    """Where inputs may come from (`allow`, see the module doc), and the limits on each
    image (ImageLimits: pipeline/output/images.py).

    Without `allow`, the folders a job reads under are its manifest's: `for_manifest` finds
    them once, on the driver, and the actors get them on the policy they check with. They
    are no spec key (job.json records the spec as given, and `from_spec` reads it back),
    so they live beside the fields, set by `for_manifest` alone."""
    allow: tuple[str, ...] | None = field(default=None, metadata={"help": (
        "the URI prefixes (local folders, `s3://bucket/prefix/`, `http(s)://host:port/path/`) "
        "the job may read images from; anything else is a row error before any request. "
        "Unset: " + DEFAULT_RULE + ". `[any]`: " + ANY_RULE + " (the manifest's URIs "
        "trusted, said by a warning in the job's log)")})

    _home: ClassVar[str | None] = None             # the manifest's folder, once resolved
    _roots: ClassVar[tuple[str, ...]] = ()          # the folders the manifest records
    _folders: ClassVar[tuple[Location, ...]] = ()   # both, parsed

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
            allow = [ANY if a.strip().lower() == ANY else a for a in allow]
            for entry in allow:
                if entry != ANY:
                    _location(entry)              # refuses a malformed entry now
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

    def for_manifest(self, manifest_uri: str,
                     manifest_schema: pa.Schema | None) -> "InputPolicy":
        """The policy a job's actors check with. With `allow` set (`[any]` included), this
        one as given. Without it, the default rule's folders made explicit: the manifest's
        folder (`manifest_folder`) and the roots its schema records (`recorded_roots`).
        Resolved once, on the driver, so each actor checks against the same folders.
        Raises SetupError for a manifest URI whose folder cannot be told."""
        if self.allow is not None:
            return self
        try:
            home = manifest_folder(manifest_uri)
        except ValueError as e:
            raise SetupError(f"inputs: cannot tell the folder of the manifest "
                             f"{redact(manifest_uri)} ({e}); list inputs.allow") from None
        roots = tuple(r for r in recorded_roots(manifest_schema) if r != home)
        policy = dataclasses.replace(self)
        object.__setattr__(policy, "_home", home)
        object.__setattr__(policy, "_roots", roots)
        object.__setattr__(policy, "_folders", tuple(_location(f) for f in (home, *roots)))
        return policy

    @property
    def allows_any(self) -> bool:
        """`inputs.allow: [any]`: the opt-out from the manifest's folders."""
        return self.allow is not None and ANY in self.allow

    def describe(self) -> str:
        """What this job may read, in one line for its log (a warning with `[any]`)."""
        if self.allow is None:
            if self._home is None:
                return f"inputs: inputs.allow unset, no manifest's folders known: {ANY_RULE}"
            return (f"inputs: reading only under {self._where()}, never hidden files or "
                    "system folders (inputs.allow unset)")
        listed = [redact(a) for a in self.allow if a != ANY]
        if self.allows_any:
            also = f", and under {', '.join(listed)}" if listed else ""
            return (f"inputs.allow: [any]: this job may read {ANY_RULE}{also}, wherever its "
                    "manifest points: its URIs are trusted, not confined to the manifest's "
                    "folders")
        return f"inputs: reading only under inputs.allow: {', '.join(listed)}"

    def check(self, uri: str) -> None:
        """Raise InputRefused unless this job may read `uri`. Makes no request."""
        try:
            where = _location(uri)
        except ValueError as e:
            raise InputRefused(f"{redact(uri)}: refused: {e}") from None
        problem = (self._default_problem(where) if self.allow is None
                   else self._listed_problem(where, self.allow))
        if problem:
            raise InputRefused(f"{redact(uri)}: refused: {problem}")

    def _listed_problem(self, where: Location, allow: tuple[str, ...]) -> str | None:
        if any(_inside(where, _location(entry)) for entry in allow if entry != ANY):
            return None
        if ANY not in allow:
            return f"not under any inputs.allow prefix ({', '.join(allow)})"
        problem = _protocol_problem(where) or _protected(where)
        return _with_rule(problem, f"inputs.allow: [any] reads {ANY_RULE}")

    def _default_problem(self, where: Location) -> str | None:
        problem = _protocol_problem(where)
        if problem:
            return problem
        if self._home is None:        # built without for_manifest: the protections alone
            return _with_rule(_protected(where), "the default rule refuses hidden files, a "
                              "home's hidden folders and system folders")
        if not any(_inside(where, folder) for folder in self._folders):
            return f"outside {self._where()}; list it in inputs.allow"
        return _with_rule(_protected(where), "the default rule refuses it even under the "
                          "manifest's folders")

    def _where(self) -> str:
        """The manifest's folders as a refusal and the log name them."""
        home = f"the manifest's folder {redact(self._home or '')}"
        if not self._roots:
            return f"{home} (it records no other roots)"
        shown = [redact(r) for r in self._roots[:SHOWN_ROOTS]]
        if len(self._roots) > SHOWN_ROOTS:
            shown.append(f"{len(self._roots) - SHOWN_ROOTS} more")
        return f"{home} and the roots it records ({', '.join(shown)})"


def manifest_folder(manifest_uri: str) -> str:
    """The folder a manifest's own inputs are expected in: on local disk its folder (the
    manifest itself when it is a folder of Parquet files), resolved; on an object store
    the prefix folder it lies in (the manifest itself when its URI ends in `/`: a
    folder of Parquet files named without the slash counts as lying in its parent).
    ValueError for a URI the access rules do not parse."""
    protocol, host, path = _location(manifest_uri)
    if protocol == "file":
        folder = "/" + "/".join(path)
        return folder if os.path.isdir(folder) else os.path.dirname(folder)
    if not manifest_uri.split("?")[0].endswith("/"):
        path = path[:-1]
    return _as_uri((protocol, host, path))


def input_root(uri: str) -> str:
    """A folder a manifest may record as a root of its inputs, normalised: a local folder
    resolved (`~`, `..`, symlinks), `s3://bucket/prefix/` with its slash. ValueError for
    anything else: another protocol (an http(s) host is read only when inputs.allow lists
    it), or the whole filesystem (that is `inputs.allow: [any]`)."""
    where = _location(uri)
    if where[0] not in DEFAULT_PROTOCOLS:
        raise ValueError(f"{redact(uri)}: a recorded root is a local folder or an s3:// "
                         "prefix; list any other in inputs.allow")
    if where[0] == "file" and not where[2]:
        raise ValueError(f"{redact(uri)}: the whole filesystem is no root (inputs.allow: "
                         "[any] opts out)")
    return _as_uri(where)


def roots_metadata(roots: Iterable[str | os.PathLike[str]]) -> dict[bytes, bytes]:
    """The Parquet metadata by which a manifest records the folders it was built from
    (each `input_root`-normalised, in order, once): what `recorded_roots` reads back."""
    normalised = list(dict.fromkeys(input_root(os.fspath(r)) for r in roots))
    return {INPUT_ROOTS_KEY: json.dumps(normalised).encode()}


def recorded_roots(schema: pa.Schema | None) -> tuple[str, ...]:
    """The folders a manifest's schema records it was built from (INPUT_ROOTS_KEY). That
    metadata is as much data as the rows: a value that is not a JSON list of folder URIs,
    or an entry `input_root` refuses, is left out with a warning; a manifest built by
    others is run with inputs.allow."""
    raw = (schema.metadata or {}).get(INPUT_ROOTS_KEY) if schema is not None else None
    if raw is None:
        return ()
    try:
        entries = json.loads(raw)
    except ValueError:
        entries = None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        log.warning("the manifest's %s is not a JSON list of folder URIs: ignored (%s)",
                    INPUT_ROOTS_KEY.decode(), redact(raw.decode("utf-8", "replace"))[:200])
        return ()
    roots = []
    for entry in entries:
        try:
            roots.append(input_root(entry))
        except ValueError as e:
            log.warning("a root the manifest records is ignored: %s", str(e)[:300])
    return tuple(dict.fromkeys(roots))

# -- a URI as (protocol, host, path segments) --------------------------------------------
def _location(uri: str) -> Location:
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


def _as_uri(where: Location) -> str:
    protocol, host, path = where
    if protocol == "file":
        return "/" + "/".join(path)
    return f"{protocol}://{host}/" + "".join(f"{s}/" for s in path)


def _local_segments(path: str) -> tuple[str, ...]:
    path = os.path.realpath(os.path.expanduser(path))
    return tuple(s for s in path.split("/") if s)


def _segments(path: str) -> tuple[str, ...]:
    parts = tuple(s for s in unquote(path).split("/") if s)
    if any(s in (".", "..") for s in parts):
        raise ValueError("'.' or '..' path segments are not accepted")
    return parts


def _http_location(uri: str) -> Location:
    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("credentials in an http(s) URI are not accepted")
    if not parts.hostname:
        raise ValueError("no host in the URI")
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, f"{parts.hostname.lower()}:{port}", _segments(parts.path)


def _inside(where: Location, prefix: Location) -> bool:
    (protocol, host, path), (p_protocol, p_host, p_path) = where, prefix
    return (protocol, host) == (p_protocol, p_host) and path[:len(p_path)] == p_path


def _protocol_problem(where: Location) -> str | None:
    """Only local files and s3:// objects are read unless inputs.allow lists a prefix."""
    protocol = where[0]
    if protocol in DEFAULT_PROTOCOLS:
        return None
    return f"{protocol}:// inputs must be listed in inputs.allow"


def _with_rule(problem: str | None, rule: str) -> str | None:
    return f"{problem} ({rule}; list it in inputs.allow)" if problem else None


def _protected(where: Location) -> str | None:
    """Why a local path is never read without being listed: a hidden file, a home's
    hidden folder (keys, tokens: `~/.aws`, `~/.ray`, `~/.ssh`), a system folder."""
    protocol, _, path = where
    if protocol != "file":
        return None
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
