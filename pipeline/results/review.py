"""A person's verdicts on edits: what the report's review pass saves, read back.

The report's before/after grid takes a verdict per edit (accept, reject or unsure, by
click or by key) and its "Save verdicts" button writes them as JSON:

    {"output": "s3://bucket/out", "verdicts": {"<id>": "accept", "<id>": "reject", ...}}

A CSV with the columns `id` and `verdict` is read too (verdicts made elsewhere).

    verdicts = read_verdicts("review.json")          {id: verdict}
    acceptance(verdicts)                              counts, rate and its 95% interval
    maskface export OUT --reviewed review.json        only the accepted rows
    maskface report OUT --reviewed review.json        the rate beside the networks'

The grid shows every edit of a small job, and a seeded random sample of a large one: a
reviewer's acceptance rate over the sample estimates the whole job's.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Mapping

from pipeline.store.storage import open_uri


VERDICTS = ("accept", "reject", "unsure")
ACCEPT = "accept"


class ReviewError(ValueError):
    """A verdicts file that cannot be used as written."""


def read_verdicts(uri: str, storage_options: Mapping | None = None) -> dict[str, str]:
    """The verdicts by id from a JSON file the report saved, or a CSV (id, verdict)."""
    try:
        with open_uri(uri, "rb", storage_options) as f:
            data = f.read()
    except FileNotFoundError:
        raise ReviewError(f"verdicts file not found: {uri}") from None
    text = data.decode("utf-8-sig", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            verdicts = json.loads(text).get("verdicts")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ReviewError(f"{uri}: not the report's verdicts JSON ({e})") from None
        if not isinstance(verdicts, dict):
            raise ReviewError(f'{uri}: no "verdicts" object (id -> verdict)')
        pairs = list(verdicts.items())
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or not {"id", "verdict"} <= set(rows[0]):
            raise ReviewError(f"{uri}: a CSV of verdicts needs the columns id and verdict")
        pairs = [(r["id"], r["verdict"]) for r in rows]
    out: dict[str, str] = {}
    for line, (rid, verdict) in enumerate(pairs, start=1):
        verdict = str(verdict).strip().lower()
        if verdict not in VERDICTS:
            raise ReviewError(f"{uri}: entry {line} (id {rid!r}): verdict {verdict!r} is not "
                              f"one of {', '.join(VERDICTS)}")
        out[str(rid)] = verdict
    return out


def acceptance(verdicts: Mapping[str, str]) -> dict:
    """How the reviewed edits ended: counts per verdict, and the accepted share of the
    edits given accept or reject (unsure ones apart) with its Wilson 95% interval."""
    counts = {v: sum(1 for x in verdicts.values() if x == v) for v in VERDICTS}
    decided = counts["accept"] + counts["reject"]
    rate = counts["accept"] / decided if decided else None
    return {**counts, "decided": decided, "rate": rate,
            "interval": wilson(counts["accept"], decided) if decided else None}


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)
