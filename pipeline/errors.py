"""The kinds of failure, and where each ends.

    RowError      this input, this edit: recorded on its row as status=error; the job goes on.
      ImageError    the bytes are no usable image (pipeline/output/images.py): corrupt, too small,
                    too large, an unsupported format
      InputRefused  the URI is outside the job's `inputs.allow`: refused before any request
      StorageError  the storage would not give or take this row's object (missing, denied,
                    unreachable after the retries)
    SetupError    the spec, the weights, the storage or the device: raised before any row
                  runs, or it ends the job.
      JobStopped    K whole batches in a row failed the same way (a bug, a broken GPU, a
                    storage outage): the job ends instead of failing every row.
"""
from __future__ import annotations

# The status of the rows an actor hands back instead of its batch's results when the job
# must end (a SetupError): never recorded, so those rows stay pending (pipeline/runner/stage.py).
STOPPED = "stopped"

# How much of a value an error message quotes (an id, a value, a path), and how long
# one message may be at most: a hostile input must not make a megabyte-long error line.
MAX_ECHO = 300
MAX_MESSAGE = 2048


def clip(text: str, limit: int = MAX_ECHO) -> str:
    """`text` as an error message may quote it: at most `limit` characters, and when cut,
    its full length said (`abc... (5,000,000 characters)`)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def clip_message(text: str) -> str:
    """A whole error message cut to MAX_MESSAGE bytes of UTF-8 at most (its length said)."""
    text = str(text)
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE:
        return text
    head = data[:MAX_MESSAGE - 40].decode("utf-8", "ignore")   # never half a character
    return f"{head}... ({len(text):,} characters)"


class RowError(ValueError):
    """A failure that belongs to one row."""


class InputRefused(RowError):
    """A row's URI that the job may not read."""


class StorageError(RowError):
    """The storage failed for one row's object; `kind` names the underlying error
    (FileNotFoundError, PermissionError, ConnectionClosedError, ...)."""

    def __init__(self, message: str, kind: str = "OSError"):
        super().__init__(message)
        self.kind = kind


class SetupError(RuntimeError):
    """A failure of the job's setup, not of any one row."""


class JobStopped(SetupError):
    """The job stopped: the same failure repeated over whole batches (a failure streak)."""
