"""The two kinds of failure, and where each ends.

    RowError    this input, this edit (an unreadable image, a numeric blow-up): recorded
                on its row as status=error; the job goes on.
    SetupError  the spec, the weights, the storage or the device: raised before any row
                runs, or it ends the job.
"""
from __future__ import annotations


class RowError(ValueError):
    """A failure that belongs to one row."""


class SetupError(RuntimeError):
    """A failure of the job's setup, not of any one row."""
