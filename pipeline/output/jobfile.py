"""job.json: what a run records of itself under its output, and how it is read back.

    {"spec":        the job spec as run, every key, defaults filled (pipeline/runner/
                    spec.py JobSpec); its `edit` holds the user's overrides, dotted
     "edit_base":   the edit settings before any attribute derives its own (every key)
     "edits":       [{"attributes", "mode", "settings"}]: each distinct edit the output
                    holds, its settings resolved as the engine ran them (every key): this
                    run's, after those of the runs before it (`merge_edits`)
     "code_version", "started_at", "rows"}

Outputs written before these names recorded the spec under "settings", with the edit
settings as the spec's overrides only; `spec_of` reads both, and `edits_of` says None
for them (their resolved settings were never recorded). Outputs written before inputs
were confined to the manifest's folders may hold "reads_outside_manifest_folder" ({rows,
folder}: how many rows read outside the manifest's folder); no run writes it now, and
readers take it or leave it (job.json is read as a mapping).
"""
from __future__ import annotations

import json
from typing import Any, Mapping

FILE = "job.json"


def job_record(spec: Mapping[str, Any], edit_base: Mapping[str, Any],
               edits: list[dict[str, Any]], **run: Any) -> dict[str, Any]:
    """The job.json of a run: its spec, its edits' settings, then `run`'s values."""
    return {"spec": dict(spec), "edit_base": dict(edit_base), "edits": list(edits), **run}


def merge_edits(previous: list[dict[str, Any]] | None, current: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """The edits a run records: those of the runs before it (`previous`, from the job.json
    it replaces), then this run's that differ from all of them. A resume that edits
    nothing, or `--retry-errors` on a few rows, keeps what the output holds."""
    merged = list(previous or [])
    seen = {_edit_key(e) for e in merged}
    for e in current:
        if _edit_key(e) not in seen:
            merged.append(e)
            seen.add(_edit_key(e))
    return merged


def _edit_key(edit: Mapping[str, Any]) -> str:
    return json.dumps([edit.get("attributes"), edit.get("mode"), edit.get("settings")],
                      sort_keys=True, default=str)


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
