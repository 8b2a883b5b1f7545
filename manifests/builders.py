"""Dataset builders: CelebA-HQ, CelebA and plain folders of images -> validated manifests.

Each builder crosses the images with the requested edits (`smiling=flip`, `male=0`, ...)
and writes one row per (image, edit) with the id `<stem>.<attribute>-<target>`.
`flip` aims at the opposite of the image's own label, which is how the paper
evaluates. Files that disagree with the images (missing or unlisted images, malformed
lines, unknown attribute names) are collected in a report: `strict` turns any of them
into an error, the default skips and counts them.

Subsets apply in the order filter -> sample -> shard -> limit.

The manifest records the folder the images came from (`images_root`; with `--align`, the
crops' folder too): without `inputs.allow` a job reads only under the manifest's own
folder and those, so a manifest built here runs as it is wherever it is written.
"""
from __future__ import annotations

import posixpath
import random
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd

from models.celeba import ATTRIBUTES
from pipeline.store.storage import filesystem, open_uri
from pipeline.engine.rows import safe_stem

from .schema import ManifestError, validate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
EDIT_VALUES = ("flip", "0", "1")


@dataclass
class Report:
    """What did not match; printed by the CLI, fatal with strict."""
    problems: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.problems.append(message)

    def summary(self, shown: int = 20) -> str:
        more = f"\n  ... and {len(self.problems) - shown} more" if len(self.problems) > shown else ""
        return "\n".join(f"  {p}" for p in self.problems[:shown]) + more


@dataclass(frozen=True)
class Subset:
    sample: int | None = None
    seed: int = 0
    shard: tuple[int, int] | None = None       # (index, count), 0-based
    limit: int | None = None


def parse_edits(items: Sequence[str], with_labels: bool) -> list[tuple[str, str]]:
    """['smiling=flip', 'male=0'] -> [('smiling', 'flip'), ('male', '0')]."""
    edits = []
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        if not sep or value not in EDIT_VALUES:
            raise ValueError(f"--edit {item!r}: expected NAME=flip|0|1")
        if name not in ATTRIBUTES:
            raise ValueError(f"--edit {item!r}: unknown attribute {name!r}")
        if value == "flip" and not with_labels:
            raise ValueError(f"--edit {item!r}: flip needs the images' labels (an attribute file)")
        edits.append((name, value))
    if not edits:
        raise ValueError("no --edit given")
    return edits


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise ValueError(f"--shard {text!r}: expected i/n with 0 <= i < n")
    return int(m[1]), int(m[2])


def parse_attribute_file(text: str, report: Report) -> tuple[list[str], dict[str, list[int]]]:
    """CelebA's layout: a count line, a header of 40 names, then `file v1 .. v40` (1/-1).

    Returns (our attribute names in header order, {file: labels as 1/0}). Header names
    map to ours in lower case (`Smiling` -> `smiling`); unknown ones are reported.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ManifestError("attribute file: expected a count line and a header line")
    header = [h.lower() for h in lines[1].split()]
    for name in header:
        if name not in ATTRIBUTES:
            report.add(f"attribute file: unknown attribute name {name!r} in the header")
    labels: dict[str, list[int]] = {}
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        values = parts[1:]
        if len(values) != len(header) or any(v not in ("1", "-1") for v in values):
            report.add(f"attribute file line {number}: malformed ({line.strip()[:80]!r})")
            continue
        labels[parts[0]] = [1 if v == "1" else 0 for v in values]
    try:
        declared = int(lines[0].split()[0])
        if declared != len(lines) - 2:
            report.add(f"attribute file: the count line says {declared}, "
                       f"found {len(lines) - 2} lines")
    except (ValueError, IndexError):
        report.add(f"attribute file: the first line is not a count ({lines[0][:40]!r})")
    return header, labels


def list_images(images_uri: str, storage_options: Mapping | None = None) -> dict[str, str]:
    """{file name: URI} for the images in a folder (or matching a glob)."""
    fs, path = filesystem(images_uri, storage_options)
    paths = fs.glob(path) if any(c in path for c in "*?[") else (
        fs.ls(path, detail=False) if fs.isdir(path) else [])
    if not paths:
        raise ManifestError(f"no images found at {images_uri}")
    protocol = images_uri.split("://")[0] + "://" if "://" in images_uri else ""
    return {posixpath.basename(p): protocol + p for p in sorted(paths)
            if p.lower().endswith(IMAGE_SUFFIXES)}


def images_root(images_uri: str) -> str:
    """The folder a builder's `--images` names, which the manifest records as a root of its
    inputs (schema.write_manifest's `input_roots`): the folder itself, or for a glob
    (`photos/*.png`, `s3://b/x/img_*.jpg`) the folder its fixed part ends in. A job then
    reads these images without `inputs.allow`, and nothing outside that folder."""
    starts = [i for i, c in enumerate(images_uri) if c in "*?["]
    if not starts:
        return images_uri
    head = images_uri[:min(starts)]
    if "/" not in head:
        return "."                            # `*.png`: the working folder
    folder = head.rsplit("/", 1)[0]
    if folder.endswith(":/"):                 # `s3://bucket*`: the glob is in the bucket
        raise ValueError(f"--images {images_uri!r}: a glob must lie below a bucket")
    return folder or "/"


def read_text(uri: str, storage_options: Mapping | None = None) -> str:
    try:
        with open_uri(uri, "r", storage_options) as f:
            return f.read()
    except FileNotFoundError:
        raise ManifestError(f"file not found: {uri}") from None


def apply_subset(files: list[str], subset: Subset) -> list[str]:
    files = sorted(files)
    if subset.sample is not None and subset.sample < len(files):
        files = sorted(random.Random(subset.seed).sample(files, subset.sample))
    if subset.shard is not None:
        index, count = subset.shard
        files = files[index::count]
    if subset.limit is not None:
        files = files[:subset.limit]
    return files


def build_rows(images: dict[str, str], edits: list[tuple[str, str]],
               labels: dict[str, list[int]] | None, header: list[str] | None,
               report: Report, subset: Subset = Subset(), strict: bool = False) -> pd.DataFrame:
    """Cross images with edits; with labels, add `attr_<name>` columns (int8 1/0)."""
    if labels is not None:
        for name in sorted(set(labels) - set(images)):
            report.add(f"{name}: listed in the attribute file, but no such image")
        for name in sorted(set(images) - set(labels)):
            report.add(f"{name}: image not listed in the attribute file")
        files = [f for f in images if f in labels]
    else:
        files = list(images)
    if strict and report.problems:
        raise ManifestError(f"{len(report.problems)} problem(s) with the input files "
                            f"(strict):\n{report.summary()}")
    records = []
    for f in apply_subset(files, subset):
        for name, value in edits:
            own = dict(zip(header, labels[f])).get(name) if labels is not None else None
            if value == "flip":
                if own is None:
                    report.add(f"{f}: no label for {name}, cannot flip")
                    continue
                target = 1 - own
            else:
                target = int(value)
            row = {"id": f"{safe_stem(f)}.{name}-{target}", "image_uri": images[f],
                   "attributes": [name], "targets": [float(target)]}
            if labels is not None:
                row.update({f"attr_{a}": v for a, v in zip(header, labels[f]) if a in ATTRIBUTES})
            records.append(row)
    df = pd.DataFrame.from_records(records, columns=["id", "image_uri", "attributes", "targets"]
                                   if not records else None)
    for col in [c for c in df.columns if c.startswith("attr_")]:
        df[col] = df[col].astype("int8")
    validate(df)
    return df


def celeba_partition(text: str, split: str, report: Report) -> set[str]:
    """list_eval_partition.txt: `file 0|1|2` (train, val, test) -> the files of `split`."""
    wanted = {"train": "0", "val": "1", "valid": "1", "test": "2"}.get(split)
    if wanted is None:
        raise ValueError(f"--split must be train, val or test, got {split!r}")
    files = set()
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            report.add(f"partition file line {number}: malformed ({line.strip()[:80]!r})")
        elif parts[1] == wanted:
            files.add(parts[0])
    return files
