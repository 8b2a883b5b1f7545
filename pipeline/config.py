"""The edit configuration: the original config.yml's settings, typed and validated.

Keys keep the original's names (`steps.latent`, `loss.weights.classf`, ...) so its
users can carry settings over; the new keys are `mode`, `e4e_init`, `e4e_start_step`,
`smoothing`, `blend`, `parser_size` and `mean_latent.*`. Overrides come as nested
mappings (YAML) or dotted keys (`--set steps.latent=200`).

Settings resolve in three layers, the later winning:
  1. the defaults below (the original's config.yml);
  2. what the attributes of a group derive (`derived_settings`): global mode starts from
     e4e with the classifier on from its first step and no Adam re-init and no dynamic
     masking; the seg loss is off without a hair attribute; a hair-shape attribute
     updates the shape mask;
  3. the keys the user set explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

from . import attributes as attr_table

# key: (default, type, check, help). Types: int, float, bool, str. The order is the README's.
SCHEMA: dict[str, tuple[Any, type, Any, str]] = {
    "steps.latent": (1000, int, lambda v: v >= 1, "latent-phase steps"),
    "steps.noise": (500, int, lambda v: v >= 0,
                    "noise-phase length: steps.noise + 1 iterations; 0 skips the phase"),
    "steps.log": (100, int, lambda v: v >= 1, "log every this many steps"),
    "optimizer.lr_latent": (0.001, float, lambda v: v > 0, "Adam learning rate, latent phase"),
    "optimizer.lr_noise": (0.1, float, lambda v: v > 0, "Adam learning rate, noise phase"),
    "optimizer.reinit": (True, bool, None, "re-create Adam when the classifier starts"),
    "loss.weights.classf": (0.005, float, lambda v: v >= 0, "classifier KL weight"),
    "loss.weights.mse": (2.0, float, lambda v: v >= 0, "recon weight in local mode (masked MSE)"),
    "loss.weights.lpips": (0.03, float, lambda v: v >= 0,
                           "recon weight in global mode (masked LPIPS)"),
    "loss.weights.seg": (0.5, float, lambda v: v >= 0, "shape (seg) weight, hair attributes"),
    "loss.weights.size": (1.0, float, lambda v: v >= 0, "size KL weight (rows with size > 0)"),
    "loss.weights.n_loss": (1.0, float, lambda v: v >= 0, "noise regularisation weight"),
    "loss.start_steps.classf": (500, int, lambda v: v >= 0, "classifier loss from this step"),
    "loss.start_steps.seg": (500, int, lambda v: v >= 0,
                             "seg and size losses, and dynamic masking, from this step"),
    "loss.start_steps.mse": (0, int, lambda v: v >= 0, "accepted for config.yml; unused there too"),
    "loss.start_steps.n_loss": (0, int, lambda v: v >= 0,
                                "accepted for config.yml; unused there too"),
    "dynamic_masking": (True, bool, None, "grow the masks with the edit region"),
    "dynamic_masking_iters": (200, int, lambda v: v >= 0,
                              "dynamic-masking window length; noise is redrawn at its end"),
    "models.update_shape": (False, bool, None, "dynamic masking also grows the shape mask"),
    "mode": ("auto", str, lambda v: v in ("auto", "local", "global"),
             "auto (from the attributes), local or global"),
    "e4e_init": (False, bool, None, "start from the e4e encoder's latent (always in global)"),
    "e4e_start_step": (300, int, lambda v: v >= 0, "first step when starting from e4e"),
    "smoothing": (0.05, float, lambda v: 0 <= v < 1, "classifier target = abs(t - smoothing)"),
    "blend": ("include_skin", str, lambda v: v in ("include_skin", "no_skin"),
              "blend the skin too (include_skin) or only the edit regions"),
    "parser_size": (512, int, lambda v: v >= 16, "face parser working size"),
    "mean_latent.source": (None, str, lambda v: v in ("computed", "checkpoint"),
                           "override the models spec's mean latent source"),
    "mean_latent.samples": (None, int, lambda v: v >= 1, "override the mean latent sample count"),
    "mean_latent.seed": (None, int, None, "override the mean latent seed"),
}
DERIVED_KEYS = ("loss.weights.seg", "models.update_shape", "e4e_init", "dynamic_masking",
                "loss.start_steps.classf", "optimizer.reinit")


class ConfigError(ValueError):
    """An edit configuration key or value that cannot be used."""


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'steps': {'latent': 5}, 'loss.weights.seg': 0} -> {'steps.latent': 5, 'loss.weights.seg': 0}."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _coerce(key: str, value: Any) -> Any:
    default, kind, check, _ = SCHEMA[key]
    if value is None and default is None:
        return None
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif kind in (int, float):
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
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        value = kind(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if check is not None and not check(value):
        raise ConfigError(f"{key}: value {value!r} is out of range ({SCHEMA[key][3]})")
    return value


@dataclass(frozen=True)
class EditConfig:
    """A validated set of settings: every SCHEMA key, plus which ones the user set."""
    values: tuple[tuple[str, Any], ...]
    user_keys: frozenset[str] = frozenset()
    _lookup: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_lookup", dict(self.values))

    def __getitem__(self, key: str) -> Any:
        return self._lookup[key]

    def as_dict(self) -> dict[str, Any]:
        return dict(self._lookup)

    @classmethod
    def from_overrides(cls, overrides: Mapping | None = None) -> "EditConfig":
        """Defaults, then `overrides` (nested or dotted keys). Unknown keys are an error."""
        given = flatten(overrides or {})
        unknown = sorted(set(given) - set(SCHEMA))
        if unknown:
            raise ConfigError(f"unknown edit setting(s): {', '.join(unknown)}; "
                              f"known: {', '.join(SCHEMA)}")
        values = {k: spec[0] for k, spec in SCHEMA.items()}
        values.update({k: _coerce(k, v) for k, v in given.items()})
        _check_together(values)
        return cls(tuple(values.items()), frozenset(given))

    @classmethod
    def from_yaml(cls, text: str) -> "EditConfig":
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise ConfigError("an edit config file must hold a mapping of settings")
        return cls.from_overrides(data)

    def with_overrides(self, overrides: Mapping) -> "EditConfig":
        merged = {k: v for k, v in self.values if k in self.user_keys}
        merged.update(flatten(overrides))
        return EditConfig.from_overrides(merged)

    def resolve(self, attributes: Iterable[str], mode: str | None = None) -> "EditConfig":
        """The effective settings for a group of rows with these attributes (see module doc)."""
        attributes = list(attributes)
        mode = mode or self["mode"]
        local = attr_table.is_local(attributes) if mode == "auto" else mode == "local"
        values = {k: spec[0] for k, spec in SCHEMA.items()}
        values.update(derived_settings(attributes, local))
        values.update({k: v for k, v in self.values if k in self.user_keys})
        values["mode"] = "local" if local else "global"
        _check_together(values)
        return EditConfig(tuple(values.items()), self.user_keys)


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


def _check_together(values: Mapping[str, Any]) -> None:
    if values["e4e_init"] and values["e4e_start_step"] >= values["steps.latent"]:
        raise ConfigError(f"e4e_start_step ({values['e4e_start_step']}) must be below "
                          f"steps.latent ({values['steps.latent']})")


def apply_mean_latent(spec, config: EditConfig):
    """The models spec with this config's `mean_latent.*` overrides applied."""
    import dataclasses
    changes = {k.split(".", 1)[1]: config[k] for k in
               ("mean_latent.source", "mean_latent.samples", "mean_latent.seed")
               if config[k] is not None}
    if not changes:
        return spec
    return dataclasses.replace(spec, mean_latent=dataclasses.replace(spec.mean_latent, **changes))


def parse_set(items: Iterable[str]) -> dict[str, str]:
    """`--set a.b=v` items -> {'a.b': 'v'} (values are coerced by EditConfig)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else value
    return out


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) rows for documentation."""
    return [(k, spec[0], spec[3]) for k, spec in SCHEMA.items()]

