"""job.json: what a run records of itself under its output, and how it is read back.

    {"spec":        the job spec as run, every key (pipeline/runner/spec.py JobSpec)
     "edit_base":   the edit settings before any attribute derives its own (every key)
     "edits":       [{"attributes", "mode", "settings"}]: each distinct edit of the run,
                    its settings resolved as the engine ran them (every key)
     "code_version", "started_at", "rows", "reads_outside_manifest_folder"}

Outputs written before these names recorded the spec under "settings", with the edit
settings as the spec's overrides only; `spec_of` reads both, and `edits_of` says None
for them (their resolved settings were never recorded).
"""
from __future__ import annotations

from typing import Any, Mapping

FILE = "job.json"


def job_record(spec: Mapping[str, Any], edit_base: Mapping[str, Any],
               edits: list[dict[str, Any]], **run: Any) -> dict[str, Any]:
    """The job.json of a run: its spec, its edits' settings, then `run`'s values."""
    return {"spec": dict(spec), "edit_base": dict(edit_base), "edits": list(edits), **run}


def spec_of(job: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job spec a job.json recorded ({} without one); older outputs' "settings"."""
    job = job or {}
    return dict(job.get("spec") or job.get("settings") or {})


def edit_base_of(job: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The edit settings before derivation, or None (an older output)."""
    base = (job or {}).get("edit_base")
    return dict(base) if isinstance(base, Mapping) else None


def edits_of(job: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """Each distinct edit's resolved settings, or None (an older output: not recorded)."""
    edits = (job or {}).get("edits")
    return list(edits) if isinstance(edits, list) else None
