"""The models spec: one YAML file naming every checkpoint by URI, with optional sha256.

    generator:   {uri: stylegan2-ffhq-config-f.pt, sha256: ...}
    face_parser: {uri: s3://bucket/weights/face_parser.pt}
    classifier:  {uri: classifier.pt}
    e4e:         {uri: e4e.pt}            # global edits only
    lpips_trunk: {uri: vgg16-397923af.pth}  # global edits only
    judge:       {uri: judge.pt}          # optional: a held-out classifier that only measures
    mean_latent: {source: computed, samples: 50000, seed: 0}
    tiny: false

Relative URIs are resolved against the spec's own location.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

import yaml

from pipeline.errors import MAX_ECHO, clip
from pipeline.store.documents import DocumentError, read_yaml
from pipeline.store.storage import write_bytes
from pipeline.store.uris import redact, resolve_uri


NETWORKS = ("generator", "face_parser", "classifier", "e4e", "lpips_trunk", "judge")
REQUIRED = ("generator", "face_parser", "classifier")
# the judge (models/judge.py) is never required: no edit needs it, and no public source
# for it exists, so `weights fetch` never downloads one
# "computed": the mapping network's average over `samples` z from `seed` (the original's
# method); "checkpoint": the generator file's latent_avg
MEAN_LATENT_SOURCES = ("computed", "checkpoint")


class SpecError(ValueError):
    """A models spec that cannot be used as written."""


@dataclass(frozen=True)
class WeightRef:
    uri: str
    sha256: str | None = None
    note: str | None = None     # e.g. "sha256 recorded at first download, not published upstream"


@dataclass(frozen=True)
class MeanLatent:
    source: str = "computed"    # one of MEAN_LATENT_SOURCES
    samples: int = 50_000
    seed: int = 0


@dataclass(frozen=True)
class ModelsSpec:
    generator: WeightRef
    face_parser: WeightRef
    classifier: WeightRef
    e4e: WeightRef | None = None
    lpips_trunk: WeightRef | None = None
    judge: WeightRef | None = None
    mean_latent: MeanLatent = field(default_factory=MeanLatent)
    tiny: bool = False          # random-weight checkpoints from `maskface weights make-tiny`

    @classmethod
    def from_dict(cls, data: Mapping, base: str | None = None) -> "ModelsSpec":
        if not isinstance(data, Mapping):
            raise SpecError(f"a models spec is a mapping, got {type(data).__name__}")
        known = set(NETWORKS) | {"mean_latent", "tiny"}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise SpecError(f"unknown key(s) in models spec: {clip(str(unknown))}; "
                            f"known: {sorted(known)}")
        missing = [k for k in REQUIRED if not data.get(k)]
        if missing:
            raise SpecError(f"models spec names no {', '.join(missing)}")
        refs = {}
        for name in NETWORKS:
            entry = data.get(name)
            if entry is None:
                continue
            if isinstance(entry, str):
                entry = {"uri": entry}
            if not isinstance(entry, Mapping) or "uri" not in entry:
                raise SpecError(f"{name}: expected {{uri: ..., sha256: ...}}, "
                                f"got {clip(repr(entry))}")
            bad = sorted(str(k) for k in set(entry) - {"uri", "sha256", "note"})
            if bad:
                raise SpecError(f"{name}: unknown key(s) {clip(str(bad))}; "
                                "allowed: uri, sha256, note")
            sha = entry.get("sha256")
            if sha is not None and (len(str(sha)) != 64 or
                                    any(c not in "0123456789abcdefABCDEF" for c in str(sha))):
                raise SpecError(f"{name}: sha256 must be 64 hex digits, got {clip(repr(sha))}")
            refs[name] = WeightRef(uri=resolve_uri(str(entry["uri"]), base),
                                   sha256=str(sha).lower() if sha else None,
                                   note=entry.get("note"))
        ml = dict(data.get("mean_latent") or {})
        bad = sorted(str(k) for k in set(ml) - {"source", "samples", "seed"})
        if bad:
            raise SpecError(f"mean_latent: unknown key(s) {clip(str(bad))}; "
                            "allowed: source, samples, seed")
        mean = MeanLatent(**ml)
        if mean.source not in MEAN_LATENT_SOURCES:
            raise SpecError(f"mean_latent.source must be one of {', '.join(MEAN_LATENT_SOURCES)}, "
                            f"got {clip(repr(mean.source))}")
        if not isinstance(mean.samples, int) or mean.samples < 1:
            raise SpecError("mean_latent.samples must be a positive integer, "
                            f"got {clip(repr(mean.samples))}")
        if not isinstance(mean.seed, int):
            raise SpecError(f"mean_latent.seed must be an integer, got {clip(repr(mean.seed))}")
        return cls(**refs, mean_latent=mean, tiny=bool(data.get("tiny", False)))

    def to_dict(self) -> dict:
        out: dict = {}
        for name in NETWORKS:
            ref = getattr(self, name)
            if ref is not None:
                out[name] = {k: v for k, v in dataclasses.asdict(ref).items() if v is not None}
        out["mean_latent"] = dataclasses.asdict(self.mean_latent)
        out["tiny"] = self.tiny
        return out


def read_spec(uri: str, storage_options: Mapping | None = None) -> ModelsSpec:
    """The models spec at `uri` (any fsspec URI), checked; SpecError names the file and
    the problem. Relative checkpoint URIs resolve against the spec's own folder. It is
    read bounded (pipeline/store/documents.py): at most MAX_SPEC_BYTES, no YAML anchors
    or aliases, so a hostile spec is refused before it can grow."""
    try:
        data = read_yaml(uri, storage_options, what="models spec")
    except DocumentError as e:
        raise SpecError(str(e)) from None
    try:
        return ModelsSpec.from_dict(data, base=uri)
    except SpecError as e:
        raise SpecError(f"{redact(uri, MAX_ECHO)}: {e}") from None


def write_spec(spec: ModelsSpec, uri: str, header: str = "",
               storage_options: Mapping | None = None) -> None:
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    write_bytes(uri, text.encode(), storage_options)
