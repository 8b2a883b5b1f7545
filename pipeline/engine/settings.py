"""Edit settings: the original config.yml's keys, typed and validated, resolved per group.

Keys keep the original's names (`steps.latent`, `loss.weights.classf`, ...) so its
users can carry settings over; the new keys are `mode`, `e4e_init`, `e4e_start_step`,
`smoothing`, `blend`, `parser_size` and `mean_latent.*`. Users give them as nested
mappings (YAML) or dotted keys (`--set steps.latent=200`); the code reads them as
attributes of a frozen `EditSettings` (`settings.loss.weights.classf`), so a misspelt
setting fails when the settings are built, not at step 500.

Settings resolve in three layers, the later winning:
  1. the defaults below (the original's config.yml);
  2. what the attributes of a group derive (`derived_settings`): global mode starts from
     e4e with the classifier on from its first step and no Adam re-init and no dynamic
     masking; the seg loss is off without a hair attribute; a hair-shape attribute
     updates the shape mask;
  3. the keys the user set explicitly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from models.spec import MEAN_LATENT_SOURCES, REQUIRED
from pipeline.errors import clip
from pipeline.store.uris import flatten

from . import attributes as attr_table
from . import rows


class ConfigError(ValueError):
    """An edit setting key or value that cannot be used."""


def setting(default: Any, help: str, check: Callable[[Any], bool] | None = None, *,
            per_image: bool = False) -> Any:
    """One setting: its default, its docs line, its range check. `per_image` settings
    may differ between the rows of one batch (they are tensors in the engine); rows
    that differ in any other setting run as separate groups."""
    return field(default=default, metadata={"help": help, "check": check,
                                            "per_image": per_image})


def _group(cls):
    return field(default_factory=cls)


@dataclass(frozen=True)
class StepSettings:
    latent: int = setting(1000, "latent-phase steps", lambda v: v >= 1)
    noise: int = setting(500, "noise-phase length: steps.noise + 1 iterations; 0 skips the "
                              "phase", lambda v: v >= 0)
    log: int = setting(100, "log every this many steps", lambda v: v >= 1)


@dataclass(frozen=True)
class OptimizerSettings:
    lr_latent: float = setting(0.001, "Adam learning rate, latent phase", lambda v: v > 0)
    lr_noise: float = setting(0.1, "Adam learning rate, noise phase", lambda v: v > 0)
    reinit: bool = setting(True, "re-create Adam when the classifier starts")


@dataclass(frozen=True)
class LossWeights:
    classf: float = setting(0.005, "classifier KL weight", lambda v: v >= 0)
    mse: float = setting(2.0, "recon weight in local mode (masked MSE)", lambda v: v >= 0)
    lpips: float = setting(0.03, "recon weight in global mode (masked LPIPS)", lambda v: v >= 0)
    seg: float = setting(0.5, "shape (seg) weight, hair attributes", lambda v: v >= 0,
                         per_image=True)
    size: float = setting(1.0, "size KL weight (rows with size > 0)", lambda v: v >= 0)
    n_loss: float = setting(1.0, "noise regularisation weight", lambda v: v >= 0)


@dataclass(frozen=True)
class LossStartSteps:
    classf: int = setting(500, "classifier loss from this step", lambda v: v >= 0)
    seg: int = setting(500, "seg and size losses, and dynamic masking, from this step",
                       lambda v: v >= 0)
    mse: int = setting(0, "accepted for config.yml; unused there too", lambda v: v >= 0)
    n_loss: int = setting(0, "accepted for config.yml; unused there too", lambda v: v >= 0)


@dataclass(frozen=True)
class LossSettings:
    weights: LossWeights = _group(LossWeights)
    start_steps: LossStartSteps = _group(LossStartSteps)


@dataclass(frozen=True)
class ModelSettings:
    update_shape: bool = setting(False, "dynamic masking also grows the shape mask",
                                 per_image=True)


@dataclass(frozen=True)
class MeanLatentOverride:
    source: str | None = setting(None, "override the models spec's mean latent source",
                                 lambda v: v in MEAN_LATENT_SOURCES)
    samples: int | None = setting(None, "override the mean latent sample count", lambda v: v >= 1)
    seed: int | None = setting(None, "override the mean latent seed")


@dataclass(frozen=True)
class EarlyStopSettings:
    enabled: bool = setting(False, "an image leaves the latent phase once on target and its "
                                   "recon has plateaued (opt-in: changes the numbers)")
    margin: float = setting(0.1, "on target: every probability past 0.5 by this much, on its "
                                 "target's side", lambda v: 0 <= v < 0.5)
    window: int = setting(50, "plateau: the recon loss now against this many steps ago",
                          lambda v: v >= 1)
    tolerance: float = setting(0.01, "plateau: at most this relative change over the window",
                               lambda v: v >= 0)
    every: int = setting(10, "check every this many steps (each check reads the device)",
                         lambda v: v >= 1)


@dataclass(frozen=True)
class EditSettings:
    """Every edit setting, typed. `EditConfig.resolve` builds the one a group of rows runs
    with; there `mode` is always 'local' or 'global'."""
    steps: StepSettings = _group(StepSettings)
    optimizer: OptimizerSettings = _group(OptimizerSettings)
    loss: LossSettings = _group(LossSettings)
    dynamic_masking: bool = setting(True, "grow the masks with the edit region")
    dynamic_masking_iters: int = setting(200, "dynamic-masking window length; noise is "
                                              "redrawn at its end", lambda v: v >= 0)
    models: ModelSettings = _group(ModelSettings)
    mode: str = setting("auto", "auto (from the attributes), local or global",
                        lambda v: rows.choice_problem("mode", v, rows.MODES) is None)
    e4e_init: bool = setting(False, "start from the e4e encoder's latent (always in global)")
    e4e_start_step: int = setting(300, "first step when starting from e4e", lambda v: v >= 0)
    smoothing: float = setting(0.05, "classifier target = abs(t - smoothing)",
                               lambda v: rows.smoothing_problem(v) is None)
    blend: str = setting("include_skin", "blend the skin too (include_skin) or only the edit "
                                         "regions", lambda v: rows.choice_problem(
                                             "blend", v, rows.BLENDS) is None)
    parser_size: int = setting(512, "face parser working size", lambda v: v >= 16)
    mean_latent: MeanLatentOverride = _group(MeanLatentOverride)
    early_stop: EarlyStopSettings = _group(EarlyStopSettings)

    @property
    def local(self) -> bool:
        return self.mode == "local"

    def as_dict(self) -> dict[str, Any]:
        """The flat dotted view: {'steps.latent': 1000, ...} in the docs' order."""
        return {key: _get(self, key) for key in SCHEMA}

    def group_key(self) -> tuple:
        """What rows must share to run in one batch: every setting but the per-image ones."""
        return tuple((k, v) for k, v in self.as_dict().items() if not SCHEMA[k].per_image)


class SettingInfo(NamedTuple):
    default: Any
    kind: type          # int, float, bool or str
    check: Callable[[Any], bool] | None
    help: str
    per_image: bool


def _walk(cls, prefix: str = "") -> Iterable[tuple[str, SettingInfo]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _walk(kind, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if args else kind            # `int | None` -> int
        yield f"{prefix}{f.name}", SettingInfo(f.default, kind, f.metadata["check"],
                                               f.metadata["help"], f.metadata["per_image"])


# Every setting by dotted key, in the docs' order.
SCHEMA: dict[str, SettingInfo] = dict(_walk(EditSettings))


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _build(cls, values: Mapping[str, Any], prefix: str = ""):
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        kwargs[f.name] = (_build(kind, values, key + ".") if dataclasses.is_dataclass(kind)
                          else values[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any) -> Any:
    info = SCHEMA[key]
    if value is None and info.default is None:
        return None
    if info.kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {clip(repr(value))}")
    elif info.kind in (int, float):
        value = _coerce_number(key, value, info.kind)
    elif not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {clip(repr(value))}")
    if info.check is not None and not info.check(value):
        raise ConfigError(f"{key}: value {clip(repr(value))} is out of range ({info.help})")
    return value


def _coerce_number(key: str, value: Any, kind: type) -> Any:
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    allowed = (int, float) if kind is float else int
    if isinstance(value, bool) or not isinstance(value, allowed):
        what = "a number" if kind is float else "an integer"
        raise ConfigError(f"{key}: expected {what}, got {clip(repr(value))}")
    return kind(value)


@dataclass(frozen=True)
class EditConfig:
    """The user's layer: validated values for the keys they set. `resolve` turns it into
    the `EditSettings` of a group of rows; `base` is the settings before any derivation."""
    user: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_overrides(cls, overrides: Mapping | None = None) -> "EditConfig":
        """Nested or dotted keys. Unknown keys and bad values are an error."""
        given = flatten(overrides or {})
        unknown = sorted(str(k) for k in set(given) - set(SCHEMA))
        if unknown:          # a hostile key or a thousand of them: quoted clipped
            raise ConfigError(f"unknown edit setting(s): {clip(', '.join(unknown))}; "
                              f"known: {', '.join(SCHEMA)}")
        config = cls(tuple((k, _coerce(k, v)) for k, v in given.items()))
        config.base                                    # the keys must also work together
        return config

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.user)

    @property
    def base(self) -> EditSettings:
        """Defaults plus the user's keys, before the attributes derive anything."""
        return _settings({k: info.default for k, info in SCHEMA.items()} | self.overrides)

    def resolve(self, attributes: Iterable[str], mode: str | None = None) -> EditSettings:
        """The effective settings for rows with these attributes (see the module doc)."""
        attributes = list(attributes)
        problem = rows.attributes_problem(attributes)
        if problem:
            raise ConfigError(problem)
        mode = mode or self.base.mode
        local = attr_table.is_local(attributes) if mode == "auto" else mode == "local"
        values = {k: info.default for k, info in SCHEMA.items()}
        values.update(derived_settings(attributes, local))
        values.update(self.overrides)
        values["mode"] = "local" if local else "global"
        return _settings(values)


def _settings(values: Mapping[str, Any]) -> EditSettings:
    if values["e4e_init"] and values["e4e_start_step"] >= values["steps.latent"]:
        raise ConfigError(f"e4e_start_step ({values['e4e_start_step']}) must be below "
                          f"steps.latent ({values['steps.latent']})")
    return _build(EditSettings, values)


def derived_settings(attributes: list[str], local: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not attr_table.has_hair(attributes):
        out["loss.weights.seg"] = 0.0
    if attr_table.has_hair_shape(attributes):
        out["models.update_shape"] = True
    if not local:
        out.update({"e4e_init": True, "dynamic_masking": False, "loss.start_steps.classf": 0,
                    "optimizer.reinit": False})
    return out


def required_networks(settings: Iterable[EditSettings]) -> tuple[str, ...]:
    """The networks that rows with these settings need: the generator, parser and
    classifier always; e4e where a row starts from it; the LPIPS trunk where a row is
    global (its recon loss is masked LPIPS)."""
    settings = list(settings)
    extra = []
    if any(s.e4e_init for s in settings):
        extra.append("e4e")
    if any(not s.local for s in settings):
        extra.append("lpips_trunk")
    return REQUIRED + tuple(extra)


def settings_sha256(settings: EditSettings, request: "rows.EditRequest | None" = None) -> str:
    """What an edit ran with, hashed (the `settings_sha256` metrics column): sha256 of the
    canonical JSON of `settings.as_dict()`, with the row's own `smoothing` and `blend`
    in place of the settings' when the row (an EditRequest) names them:
    json.dumps(values, sort_keys=True, separators=(",", ":")) in UTF-8. Two rows with
    the same hash ran the same optimisation (the same networks aside: *_sha256)."""
    values = settings.as_dict()
    for name in ("smoothing", "blend"):
        own = getattr(request, name, None)
        if own is not None:
            values[name] = own
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def settings_key(attributes: Iterable[str], mode: str | None) -> tuple:
    """What a row's settings depend on: its attributes and its mode column. A job
    resolves each distinct key once and hands the settings to its actors by key."""
    return (tuple(attributes), mode or "auto")


def apply_mean_latent(spec, settings: EditSettings):
    """The models spec with the settings' `mean_latent.*` overrides applied."""
    changes = {k: v for k, v in dataclasses.asdict(settings.mean_latent).items() if v is not None}
    if not changes:
        return spec
    return dataclasses.replace(spec, mean_latent=dataclasses.replace(spec.mean_latent, **changes))
