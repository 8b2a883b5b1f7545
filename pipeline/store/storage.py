"""Storage through fsspec: the retry policy, reads with a size cap, whole-or-absent
writes, and storage failures named as errors.

    filesystem(uri, options)          (fs, path) with the retry policy below
    open_uri(uri, mode, options)      a file object, the same policy
    read_bytes(uri, max_bytes, ...)   a file's bytes, refused past a size
    read_many(uris, options)          many files' bytes, fetched concurrently
    write_bytes(uri, data, ...)       a file written whole or not at all
    replaced_atomically(path)         a local temporary path renamed onto `path` at the end

S3 requests are retried in layers, two of them configured here (botocore's unless
`storage_options` sets `config_kwargs.retries` itself):

    botocore   each request, up to S3_ATTEMPTS attempts in all ("standard" mode:
               exponential backoff with jitter, at most 20 s between attempts), on 5xx
               responses, throttling (SlowDown), dropped connections and timeouts;
    s3fs       each call of botocore, up to S3FS_RETRIES times, again, but only on
               dropped connections, timeouts and SlowDown (not on other 5xx responses);
               a read (GET) is wrapped twice: once around the request, once around
               reading its body (a body cut short is retried only here);
    aiohttp    sends a request once more when its connection closes without a response.

So, as measured through the fault proxy of the tests (tests/test_reliability.py), one
operation makes at most:
    5xx error            S3_ATTEMPTS                               =  4 requests
    throttling           S3_ATTEMPTS x S3FS_RETRIES                =  8
    dropped connection   2 x S3_ATTEMPTS x S3FS_RETRIES            = 16 (writes, HEAD)
                         2 x S3_ATTEMPTS x S3FS_RETRIES^2          = 32 (reads)
then fails. CONNECT_TIMEOUT_S and READ_TIMEOUT_S bound each attempt: nothing waits forever.
"""
from __future__ import annotations

import contextlib
import copy
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

import fsspec

from pipeline.errors import MAX_ECHO, RowError, StorageError, clip

from .uris import flatten, redact

# Keys that would put credentials in a job spec or a command line (and so in job.json or
# a shell history); they come from the standard AWS chain or the environment instead.
CREDENTIAL_KEYS = {"key", "secret", "token", "password", "aws_access_key_id",
                   "aws_secret_access_key", "aws_session_token", "session_token"}

def credentials_in(storage_options: Mapping | None) -> list[str]:
    """The (dotted) keys of storage options that would hold credentials."""
    return sorted(k for k in flatten(dict(storage_options or {}))
                  if k.rsplit(".", 1)[-1].lower() in CREDENTIAL_KEYS)


def refuse_credentials(storage_options: Mapping | None, where: str) -> None:
    """ValueError when storage options hold credentials: they would reach job.json, a
    log or a shell history. They come from the standard AWS chain or the environment."""
    leaked = credentials_in(storage_options)
    if leaked:
        raise ValueError(f"{clip(where)} must not hold credentials ({clip(str(leaked))}); "
                         "use the standard AWS chain or environment variables")


S3_ATTEMPTS = 4            # botocore total_max_attempts, per request
S3FS_RETRIES = 2           # s3fs tries per call (its own default of 5 multiplies too much)
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


def _storage_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]     # TimeoutError and fsspec's too
    try:
        from botocore.exceptions import BotoCoreError, ClientError
        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as AiohttpError
        errors.append(AiohttpError)
    except ImportError:
        pass
    return tuple(errors)


# What a storage call can raise once the libraries gave up (s3fs passes some on untranslated).
STORAGE_ERRORS = _storage_errors()
# Kinds that belong to one object, not to the storage as a whole.
OBJECT_KINDS = ("FileNotFoundError", "PermissionError", "IsADirectoryError",
                "NotADirectoryError")


def with_retries(uri: str, storage_options: Mapping | None) -> dict[str, Any]:
    """The options with this module's S3 retry policy and timeouts filled in (S3 URIs)."""
    options = copy.deepcopy(dict(storage_options or {}))
    if not uri.lower().startswith(("s3://", "s3a://")):
        return options
    config = options.setdefault("config_kwargs", {})
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": S3_ATTEMPTS})
    config.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
    config.setdefault("read_timeout", READ_TIMEOUT_S)
    return options


def filesystem(uri: str, storage_options: Mapping | None = None):
    """(fs, path) for a URI, with the retry policy applied."""
    fs, path = fsspec.core.url_to_fs(uri, **with_retries(uri, storage_options))
    if hasattr(fs, "retries"):              # s3fs: a class default, set per instance
        fs.retries = S3FS_RETRIES
    return fs, path


def storage_error(error: BaseException, uri: str, action: str) -> StorageError:
    """A storage failure as a row error: what was done to which object, and why; the URI
    and the library's detail each clipped (a hostile URI, or a library quoting a whole
    request, must not make a megabyte-long error on a metrics row)."""
    kind = type(error).__name__
    if isinstance(error, FileNotFoundError):
        what = "not found"
    elif isinstance(error, PermissionError):
        what = "access denied"
    else:
        what = f"storage error while {action}"
    detail = " ".join(str(error).split()) or kind
    return StorageError(f"{redact(uri, MAX_ECHO)}: {what} "
                        f"({kind}: {redact(detail, MAX_ECHO)})", kind)


def is_outage(error: StorageError) -> bool:
    """A failure of the storage as a whole (unreachable, 5xx after retries), not of one
    object (missing, denied): those are what a failure streak counts (pipeline/runner/stage.py)."""
    return error.kind not in OBJECT_KINDS


def open_uri(uri: str, mode: str = "rb", storage_options: Mapping | None = None) -> IO:
    """A file object for a URI (a context manager), with the retry policy applied. For
    reading: a write through it is neither whole-or-absent nor makes its folder
    (`write_bytes` does both)."""
    fs, path = filesystem(uri, storage_options)
    return fs.open(path, mode)


def read_many(uris: Iterable[str], storage_options: Mapping | None = None
              ) -> dict[str, bytes | BaseException]:
    """Many files' bytes by URI, fetched concurrently, one batch per filesystem (on S3 one
    GET per file, many in flight); a file that could not be read has its exception."""
    by_protocol: dict[str, list[str]] = {}
    for uri in uris:
        by_protocol.setdefault(fsspec.utils.get_protocol(uri), []).append(uri)
    found: dict[str, bytes | BaseException] = {}
    for group in by_protocol.values():
        fs, _ = filesystem(group[0], storage_options)
        paths = {uri: fs._strip_protocol(uri) for uri in group}
        try:
            got = fs.cat(sorted(set(paths.values())), on_error="return")
        except Exception as e:                 # noqa: BLE001 -- given per file, as below
            got = {path: e for path in paths.values()}
        for uri, path in paths.items():
            found[uri] = got.get(path, FileNotFoundError(path))
    return found


class ReadRefused(RowError):
    """A file this read will not take: a folder, or larger than its cap."""


def read_bytes(uri: str, max_bytes: int, storage_options: Mapping | None = None) -> bytes:
    """A file's bytes, refused (ReadRefused) when over `max_bytes`: its size is asked
    first, and the read itself stops one byte past the limit (a size the storage does
    not report, or a file that grew, cannot make it read more). A storage failure
    raises StorageError naming the object."""
    name = redact(uri, MAX_ECHO)
    fs, path = filesystem(uri, storage_options)
    try:
        info = fs.info(path)
        if info.get("type") == "directory":
            raise ReadRefused(f"{name}: is a directory")
        size = info.get("size")
        if size is not None and size > max_bytes:
            raise ReadRefused(f"{name}: {size:,} bytes, over the limit of {max_bytes:,}: "
                              "refused before reading")
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except IsADirectoryError:
        raise ReadRefused(f"{name}: is a directory") from None
    except STORAGE_ERRORS as e:
        raise storage_error(e, uri, "reading") from None
    if len(data) > max_bytes:
        raise ReadRefused(f"{name}: over the limit of {max_bytes:,} bytes: refused")
    return data


def is_local_fs(fs) -> bool:
    """A filesystem of local files (where a write needs a rename to be whole)."""
    protocol = fs.protocol
    return "file" in ((protocol,) if isinstance(protocol, str) else tuple(protocol))


def write_bytes(uri: str, data: bytes, storage_options: Mapping | None = None) -> None:
    """Write one file whole or not at all, its folder made as needed: on local disk under
    a hidden temporary name, then renamed; on an object store one PUT is atomic already.
    A storage failure raises StorageError naming the object."""
    fs, path = filesystem(uri, storage_options)
    try:
        put_file(fs, path, data)
    except STORAGE_ERRORS as e:
        raise storage_error(e, uri, "writing") from None


def put_file(fs, path: str, data: bytes) -> None:
    """`write_bytes` on a filesystem already open (an output's): whole or absent."""
    if not is_local_fs(fs):
        fs.pipe_file(path, data)
        return
    folder = path.rpartition("/")[0]
    if folder:
        fs.makedirs(folder, exist_ok=True)
    with replaced_atomically(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


@contextlib.contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary path beside the local `path`: what the block writes there is
    renamed onto `path` when it ends (atomic: a reader sees the old file or the new one,
    never a part), and removed if it raises. Every whole-file write of the project goes
    through it; the two renames that are not one file written whole are a compiled
    extension's build folder (models/extension.py, where another process may win) and a
    download's resumable `.part` file (models/fetch.py)."""
    dest = Path(path)
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.name}")
    try:
        yield tmp
        os.replace(tmp, dest)        # fails on a folder (shutil.move would not)
    finally:
        if tmp.exists():
            tmp.unlink()
