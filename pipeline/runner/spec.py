"""The job spec: the keys of `maskface run JOB.yaml`, each with its default, help and check.

    job = JobSpec.from_dict(load_yaml(text, "job.yaml"), where="job.yaml")

Every key is a field below, in the pattern of the edit settings
(pipeline/engine/settings.py): the field holds its default, the line the docs show, and
its check. A value of the wrong type, out of range, or an unknown key raises
JobSpecError naming the key. Three mappings are parsed here, once, into the values the
job uses: `edit` into an EditConfig (the edit settings, resolved per attribute group by
the plan), `runtime` into a Runtime, `inputs` into an InputPolicy; `storage_options`
stays a mapping, refused if it holds credentials. `as_dict` gives the plain values back
(what job.json records, and what `from_dict` reads again).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from pipeline.engine.runtime import Runtime
from pipeline.engine.settings import ConfigError, EditConfig
from pipeline.errors import clip, clip_message
from pipeline.store.storage import refuse_credentials

from .access import InputPolicy


class JobSpecError(ValueError):
    """A job spec that cannot run as written."""


Check = Callable[[str, Any], "str | None"]     # (key, value) -> what is wrong, or None


def key(default: Any, help: str, check: Check | None = None) -> Any:
    """One key of the spec: its default (MISSING: required), the line the docs show, and
    the check of a value of the right type. A mapping default is copied per spec."""
    metadata = {"help": help, "check": check, "parse": None}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


Parse = Callable[[Mapping[str, Any]], Any]    # a mapping -> its typed value; ValueError


def parsed(parse: Parse, plain: Callable[[Any], dict], help: str) -> Any:
    """A mapping key parsed into a typed value (`parse`; its ValueError is the problem),
    and the value given back as a plain mapping (`plain`). Unset: the empty mapping's."""
    return field(default_factory=lambda: parse({}),
                 metadata={"help": help, "check": None, "parse": parse, "plain": plain})


def _at_least(low: float, words: str) -> Check:
    def check(name: str, value: Any) -> str | None:
        return None if value >= low else f"{name} must be {words}, got {clip(repr(value))}"
    return check


def _above_zero(name: str, value: Any) -> str | None:
    return None if value > 0 else f"{name} must be > 0, got {clip(repr(value))}"


def _edit(value: Mapping[str, Any]) -> EditConfig:
    try:
        return EditConfig.from_overrides(value)
    except ConfigError as e:
        raise ValueError(f"edit: {e}") from None


def _runtime(value: Mapping[str, Any]) -> Runtime:
    try:
        return Runtime(**value)
    except (TypeError, ValueError) as e:         # Runtime's messages quote the given key
        raise ValueError(f"runtime: {clip(str(e))}; keys: "
                         f"{', '.join(f.name for f in dataclasses.fields(Runtime))}") from None


def _plain_inputs(policy: InputPolicy) -> dict[str, Any]:
    values = dataclasses.asdict(policy)
    values["allow"] = None if policy.allow is None else list(policy.allow)
    return values


def _storage(name: str, value: Any) -> str | None:
    try:
        refuse_credentials(value, name)
    except ValueError as e:
        return str(e)
    return None


_POSITIVE = _at_least(1, "a positive integer")


def _png_level(name: str, value: Any) -> str | None:
    return None if 0 <= value <= 9 else f"{name} must be 0 to 9, got {clip(repr(value))}"


def _lease_expiry(name: str, value: Any) -> str | None:
    """From a second (a heartbeat every quarter of it) to a day (a run that finds the
    lease of a dead driver waits this long at most)."""
    return None if 1 <= value <= 86_400 else (f"{name} must be between 1 and 86400 "
                                              f"seconds, got {clip(repr(value))}")


@dataclass(frozen=True)
class JobSpec:
    """A job spec, every key checked (`from_dict`); frozen, so the driver and each actor
    see the same one. The keys, their defaults and meanings: docs/job-spec.md."""
    manifest: str = key(MISSING, "manifest URI (Parquet)")
    output: str = key(MISSING, "output URI (local path, `s3://...`)")
    models: str = key(MISSING, "models spec URI")
    edit: EditConfig = parsed(_edit, lambda config: config.overrides,
                              "edit settings, same keys as `maskface edit --set`, nested or "
                              "dotted (Editing settings)")
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
    runtime: Runtime = parsed(_runtime, dataclasses.asdict,
                              "how the engine runs (the `runtime.*` keys below)")
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
    inputs: InputPolicy = parsed(InputPolicy.from_spec, _plain_inputs,
                                 "what the job may read and the limits on each image (the "
                                 "`inputs.*` keys below)")
    stop_after_failed_batches: int = key(3, "stop the job when this many whole batches in a "
                                            "row fail the same way (0: never)",
                                         _at_least(0, "an integer >= 0 (0: never stop)"))
    png_compress_level: int = key(1, "zlib level of the PNGs a job writes (images, masks, "
                                     "pasted), 0-9: 1 writes a 1024 px image in ~80 ms at "
                                     "~1.3 MB, 6 (Pillow's default) in ~370 ms at ~1.2 MB; "
                                     "the pixels are the same", _png_level)
    lease_expiry_s: float = key(60.0, "a run holds a lease on its output, renewed every "
                                      "5 s (or a quarter of this, if less); another run "
                                      "takes it over once its heartbeat is this many seconds "
                                      "old (docs/reliability.md, One run per output)",
                                _lease_expiry)

    def __post_init__(self):
        """A parsed key given as a plain mapping (`JobSpec(edit={...})` in code) is
        parsed here, as `from_dict` parses it: the spec holds only typed values."""
        for f in dataclasses.fields(self):
            value, parse = getattr(self, f.name), f.metadata["parse"]
            if parse is not None and isinstance(value, Mapping):
                try:
                    object.__setattr__(self, f.name, parse(value))
                except ValueError as e:
                    raise JobSpecError(clip_message(str(e))) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "job spec") -> "JobSpec":
        """A spec from its mapping; JobSpecError (prefixed with `where`) on any problem.
        Every value a message quotes is clipped (pipeline.errors.clip), and the message
        as a whole too: a hostile spec cannot make a megabyte-long error."""
        where = clip(where)
        if not isinstance(data, Mapping):
            raise JobSpecError(f"{where}: a job spec is a mapping of keys")
        known = [k.name for k in keys()]
        unknown = sorted(str(k) for k in set(data) - set(known))
        if unknown:
            raise JobSpecError(f"{where}: unknown key(s) {clip(str(unknown))}; "
                               f"known: {sorted(known)}")
        missing = [k.name for k in keys() if k.required and not data.get(k.name)]
        if missing:
            raise JobSpecError(f"{where}: missing {', '.join(missing)}")
        values = {}
        for k in keys():
            if k.name in data:
                try:
                    values[k.name] = k.value(data[k.name])
                except ValueError as e:
                    raise JobSpecError(clip_message(f"{where}: {e}")) from None
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """Every key with its plain value, the parsed mappings given back as mappings:
        what job.json records under `spec`, and what `from_dict` reads again."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            plain = f.metadata.get("plain")
            out[f.name] = plain(value) if plain else copy.deepcopy(value)
        return out


class Key(NamedTuple):
    """One key of the spec, as the docs and the checks see it."""
    name: str
    kind: type                 # str, int, float, bool or dict (a mapping, parsed or kept)
    optional: bool             # None is a value (`actors`)
    default: Any               # MISSING for a required key; a mapping key's: {}
    help: str
    check: Check | None
    parse: Parse | None        # a mapping key's parser into its typed value

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def value(self, given: Any) -> Any:
        """The value the spec keeps for what was given: checked (ValueError says what is
        wrong), floats as floats, a parsed mapping as its typed value."""
        if given is None and (self.optional or self.kind is dict):
            given = {} if self.kind is dict else None     # `inputs:` left empty; `actors: null`
        elif (not isinstance(given, _ACCEPTS[self.kind])
                or (isinstance(given, bool) and self.kind is not bool)
                or (isinstance(given, str) and not given.strip())):
            raise ValueError(f"{self.name} must be {_KIND_WORDS[self.kind]}, "
                             f"got {clip(repr(given))}")
        elif self.check:
            problem = self.check(self.name, given)
            if problem:
                raise ValueError(problem)
        if self.parse is not None:
            return self.parse(given)
        if self.kind is dict:
            return dict(given)
        return float(given) if self.kind is float and given is not None else given


_KIND_WORDS = {str: "a non-empty string", int: "an integer", float: "a number",
               bool: "true or false", dict: "a mapping"}
_ACCEPTS: dict[type, type | tuple[type, ...]] = {str: str, int: int, float: (int, float),
                                                  bool: bool, dict: Mapping}


def keys() -> Iterator[Key]:
    """The spec's keys in order, with their types, defaults, help and checks."""
    hints = typing.get_type_hints(JobSpec)
    for f in dataclasses.fields(JobSpec):
        parse = f.metadata["parse"]
        kind = dict if parse else hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        default = ({} if parse else f.default if f.default_factory is MISSING
                   else f.default_factory())
        yield Key(f.name, args[0] if args else kind, bool(args), default,
                  f.metadata["help"], f.metadata["check"], parse)


def mapping_keys() -> tuple[str, ...]:
    """The keys whose values are mappings (`--set inputs.allow=...` reaches inside them)."""
    return tuple(k.name for k in keys() if k.kind is dict)
