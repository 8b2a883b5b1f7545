"""The job spec: the keys of `maskface run JOB.yaml`, each with its default, help and check.

    job = JobSpec.from_dict(yaml.safe_load(text), where="job.yaml")

Every key is a field below, in the pattern of the edit settings
(pipeline/engine/settings.py): the field holds its default, the line the docs show, and
its check. A value of the wrong type, out of range, or an unknown key raises
JobSpecError naming the key. The four mappings are checked by what they configure:
`edit` by EditConfig (and kept as dotted keys), `inputs` by InputPolicy, `runtime` by
Runtime; `storage_options` may not hold credentials.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from pipeline.engine.runtime import Runtime
from pipeline.engine.settings import ConfigError, EditConfig
from pipeline.store.storage import refuse_credentials
from pipeline.store.uris import flatten

from .access import InputPolicy


class JobSpecError(ValueError):
    """A job spec that cannot run as written."""


Check = Callable[[str, Any], "str | None"]     # (key, value) -> what is wrong, or None


def key(default: Any, help: str, check: Check | None = None) -> Any:
    """One key of the spec: its default (MISSING: required), the line the docs show, and
    the check of a value of the right type. A mapping default is copied per spec."""
    metadata = {"help": help, "check": check}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def _at_least(low: float, words: str) -> Check:
    def check(name: str, value: Any) -> str | None:
        return None if value >= low else f"{name} must be {words}, got {value!r}"
    return check


def _above_zero(name: str, value: Any) -> str | None:
    return None if value > 0 else f"{name} must be > 0, got {value!r}"


def _edit(name: str, value: Any) -> str | None:
    try:
        EditConfig.from_overrides(value)
    except ConfigError as e:
        return f"{name}: {e}"
    return None


def _inputs(name: str, value: Any) -> str | None:
    try:
        InputPolicy.from_spec(value)
    except ValueError as e:
        return str(e)
    return None


def _runtime(name: str, value: Any) -> str | None:
    try:
        Runtime(**value)
    except (TypeError, ValueError) as e:
        return f"{name}: {e}; keys: {', '.join(f.name for f in dataclasses.fields(Runtime))}"
    return None


def _storage(name: str, value: Any) -> str | None:
    try:
        refuse_credentials(value, name)
    except ValueError as e:
        return str(e)
    return None


_POSITIVE = _at_least(1, "a positive integer")


@dataclass(frozen=True)
class JobSpec:
    """A job spec, every key checked (`from_dict`); frozen, so the driver and each actor
    see the same one. The keys, their defaults and meanings: docs/job-spec.md."""
    manifest: str = key(MISSING, "manifest URI (Parquet)")
    output: str = key(MISSING, "output URI (local path, `s3://...`)")
    models: str = key(MISSING, "models spec URI")
    edit: dict = key({}, "edit settings, same keys as `maskface edit --set`, nested or "
                         "dotted (Editing settings)", _edit)
    batch_size: int = key(4, "rows per engine call; on a GPU with `auto_batch`, the most it "
                             "may use", _POSITIVE)
    auto_batch: bool = key(True, "a GPU actor probes, once, the largest batch up to "
                                 "`batch_size` whose heaviest step fits in memory (doubling, "
                                 "then bisecting, backing off on CUDA out-of-memory); on a CPU "
                                 "`batch_size` is used as given (running out of memory there "
                                 "kills the process instead of raising)")
    share_prefix: bool = key(True, "each image's shared inversion prefix runs once and every "
                                   "local edit of it branches from there; kept under "
                                   "`prefixes/` for later jobs")
    runtime: dict = key({}, "how the engine runs (the `runtime.*` keys below)", _runtime)
    actors: int | None = key(None, "actor count; unset: one per GPU, or 1 CPU actor on a "
                                   "cluster without GPUs", _POSITIVE)
    cpu_threads: int = key(2, "torch threads of a CPU actor", _POSITIVE)
    actor_cpus: float = key(0.25, "CPUs reserved by each GPU actor; capped so actors never "
                                  "hold every CPU (the read tasks would starve and the job "
                                  "hang)", _above_zero)
    storage_options: dict = key({}, "fsspec options, e.g. `{client_kwargs: {endpoint_url: "
                                    "...}}`; credentials are refused here: they come from the "
                                    "standard AWS chain or the environment", _storage)
    save_noises: bool = key(False, "also write `noises/<id>.npz`")
    paste_back: bool = key(False, "for rows with `source_uri` and `align_quad` (from "
                                  "`--align`), also write `pasted/<id>.png`: the edit "
                                  "blended back into the full photo")
    no_progress_timeout_s: float = key(7200.0, "Ray Data's no-progress timeout, seconds; must "
                                               "exceed the time of one batch (Ray's default "
                                               "of 1800 s kills slow batches)", _above_zero)
    retry_errors: bool = key(False, "recompute the rows that ended in error, as "
                                    "`--retry-errors`")
    inputs: dict = key({}, "what the job may read and the limits on each image (the "
                           "`inputs.*` keys below)", _inputs)
    stop_after_failed_batches: int = key(3, "stop the job when this many whole batches in a "
                                            "row fail the same way (0: never)",
                                         _at_least(0, "an integer >= 0 (0: never stop)"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "job spec") -> "JobSpec":
        """A spec from its mapping; JobSpecError (prefixed with `where`) on any problem."""
        if not isinstance(data, Mapping):
            raise JobSpecError(f"{where}: a job spec is a mapping of keys")
        known = [k.name for k in keys()]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise JobSpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        missing = [k.name for k in keys() if k.required and not data.get(k.name)]
        if missing:
            raise JobSpecError(f"{where}: missing {', '.join(missing)}")
        values = {}
        for k in keys():
            if k.name in data:
                problem = k.problem(data[k.name])
                if problem:
                    raise JobSpecError(f"{where}: {problem}")
                values[k.name] = k.normal(data[k.name])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every key and value (what job.json records under `settings`)."""
        return dataclasses.asdict(self)


class Key(NamedTuple):
    """One key of the spec, as the docs and the checks see it."""
    name: str
    kind: type                 # str, int, float, bool or dict
    optional: bool             # None is a value (`actors`)
    default: Any               # MISSING for a required key
    help: str
    check: Check | None

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def problem(self, value: Any) -> str | None:
        """What is wrong with a value for this key, or None."""
        if value is None and (self.optional or self.kind is dict):
            return None                       # `actors: null`; `inputs:` left empty
        if (not isinstance(value, _ACCEPTS[self.kind])
                or (isinstance(value, bool) and self.kind is not bool)
                or (isinstance(value, str) and not value.strip())):
            return f"{self.name} must be {_KIND_WORDS[self.kind]}, got {value!r}"
        return self.check(self.name, value) if self.check else None

    def normal(self, value: Any) -> Any:
        """The value as the spec keeps it: floats as floats, `edit` as dotted keys."""
        if self.kind is dict:
            return flatten(value or {}) if self.name == "edit" else dict(value or {})
        if value is None:
            return None
        return float(value) if self.kind is float else value


_KIND_WORDS = {str: "a non-empty string", int: "an integer", float: "a number",
               bool: "true or false", dict: "a mapping"}
_ACCEPTS: dict[type, type | tuple[type, ...]] = {str: str, int: int, float: (int, float),
                                                  bool: bool, dict: Mapping}


def keys() -> Iterator[Key]:
    """The spec's keys in order, with their types, defaults, help and checks."""
    hints = typing.get_type_hints(JobSpec)
    for f in dataclasses.fields(JobSpec):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        default = f.default if f.default_factory is MISSING else f.default_factory()
        yield Key(f.name, args[0] if args else kind, bool(args), default,
                  f.metadata["help"], f.metadata["check"])


def mapping_keys() -> tuple[str, ...]:
    """The keys whose values are mappings (`--set inputs.allow=...` reaches inside them)."""
    return tuple(k.name for k in keys() if k.kind is dict)
