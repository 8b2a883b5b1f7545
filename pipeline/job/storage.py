"""Storage through fsspec: the retry policy, and storage failures named as errors.

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

import copy
from typing import Any, Mapping

import fsspec

from models.checkpoints import redact
from pipeline.engine.settings import flatten
from pipeline.errors import StorageError

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
        raise ValueError(f"{where} must not hold credentials ({leaked}); use the standard "
                         "AWS chain or environment variables")


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
    """A storage failure as a row error: what was done to which object, and why."""
    kind = type(error).__name__
    if isinstance(error, FileNotFoundError):
        what = "not found"
    elif isinstance(error, PermissionError):
        what = "access denied"
    else:
        what = f"storage error while {action}"
    detail = " ".join(str(error).split()) or kind
    return StorageError(f"{redact(uri)}: {what} ({kind}: {redact(detail)})", kind)


def is_outage(error: StorageError) -> bool:
    """A failure of the storage as a whole (unreachable, 5xx after retries), not of one
    object (missing, denied): those are what a failure streak counts (pipeline/job/stage.py)."""
    return error.kind not in OBJECT_KINDS
