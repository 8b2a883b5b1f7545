"""What the driver decides once, before Ray starts, and how it hands rows to the actors.

    plan = plan_job(todo, job, schema)      each distinct edit's settings, the networks
                                            they need, the models spec, the metrics schema
    image_groups(schedule_order(todo, plan), job.batch_size)   the dataset Ray Data runs
"""
from __future__ import annotations

import importlib.metadata
import pickle
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from models.loaders import check_spec_names
from models.spec import ModelsSpec, read_spec
from pipeline.engine.settings import (EditSettings, apply_mean_latent, required_networks,
                                      settings_key)

from .spec import JobSpec


@dataclass(frozen=True)
class JobPlan:
    """Each distinct edit's settings, the networks they need, the models spec the actors
    load (mean-latent overrides applied) and the metrics schema they write."""
    resolved: dict[tuple, EditSettings]     # by settings_key(attributes, mode)
    networks: tuple[str, ...]
    models_spec: ModelsSpec
    parser_size: int
    schema: pa.Schema                       # metrics columns, passthrough columns included
    code_version: str = "unknown"           # what every row records it was written by

    def settings_of(self, attributes, mode) -> EditSettings:
        return self.resolved[settings_key(attributes, mode)]

    def edits(self) -> list[dict]:
        """Each distinct edit with its resolved settings, as job.json records them."""
        return [{"attributes": list(attributes), "mode": settings.mode,
                 "settings": settings.as_dict()}
                for (attributes, _), settings in sorted(self.resolved.items())]


def plan_job(todo: pd.DataFrame, job: JobSpec, schema: pa.Schema) -> JobPlan:
    """Resolve each distinct edit once; a network the edits need that the models spec
    lacks is an error here, before any row runs."""
    config = job.edit
    keys = {settings_key(a, m) for a, m in zip(todo["attributes"], todo["mode"])}
    resolved = {key: config.resolve(*key) for key in keys}
    networks = required_networks(resolved.values())
    models_spec = apply_mean_latent(read_spec(job.models, job.storage_options), config.base)
    check_spec_names(models_spec, networks, job.models)
    if models_spec.judge is not None:           # no edit needs it; every edit is measured by it
        networks += ("judge",)
    return JobPlan(resolved, networks, models_spec, config.base.parser_size, schema,
                   code_version())


def code_version() -> str:
    """The installed maskface version, and the git commit when the code is a checkout
    (`git describe --always --dirty`): what job.json and every metrics row record."""
    try:
        version = importlib.metadata.version("maskface")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        here = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version} ({commit})" if commit else version


def schedule_order(todo: pd.DataFrame, plan: JobPlan) -> pd.DataFrame:
    """Rows that share a schedule go together into batches: sorted by group, then id."""
    group = [plan.settings_of(a, m) for a, m in zip(todo["attributes"], todo["mode"])]
    order = {k: i for i, k in enumerate(sorted({(s.mode, repr(s.group_key())) for s in group}))}
    todo = todo.assign(_group=[order[(s.mode, repr(s.group_key()))] for s in group])
    return todo.sort_values(["_group", "id"]).drop(columns="_group").reset_index(drop=True)


def image_groups(todo: pd.DataFrame, most: int) -> pd.DataFrame:
    """One dataset row per input image, holding up to `most` of its edit rows (in
    schedule order), pickled: an image's edits reach an actor call together, so its
    shared inversion prefix runs once there (an image with more rows than `most` is
    split, so that it cannot hold one actor while others idle; its later parts find the
    prefix in the actor's memory or the output). Every manifest value (a passthrough
    timestamp, an align_quad list or null) reaches the actor as pandas gave it, untouched
    by Ray Data's column conversions. The bytes go from this driver to its actors only
    (`stage.unpack` reads them)."""
    groups: dict[str, list[dict]] = {}
    for row in todo.to_dict("records"):
        groups.setdefault(row["image_uri"], []).append(row)
    parts = [(uri, rows[k:k + most]) for uri, rows in groups.items()
             for k in range(0, len(rows), most)]
    return pd.DataFrame({"image_uri": [uri for uri, _ in parts],
                         "rows": [pickle.dumps(rows) for _, rows in parts]})
