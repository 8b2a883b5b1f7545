"""Command-line options that several commands share, defined once: storage options,
`--set KEY=VALUE` items and edit settings files."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import yaml

STORAGE_OPTIONS_HELP = ('fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": '
                        '"..."}}\'; credentials come from the environment, never from here')


def add_storage_options(parser) -> None:
    parser.add_argument("--storage-options", metavar="JSON", help=STORAGE_OPTIONS_HELP)


def storage_options(args) -> dict:
    """--storage-options as a dict: a JSON object without credentials (ValueError)."""
    from pipeline.store.storage import refuse_credentials
    if not args.storage_options:
        return {}
    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not JSON: {e}") from None
    if not isinstance(options, dict):
        raise ValueError("--storage-options must be a JSON object")
    refuse_credentials(options, "--storage-options")
    return options


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`--set a.b=v` items -> {'a.b': v}, each value read as YAML (`true`, `3`, `[a, b]`);
    what the value may be is the checked setting's business (EditConfig, JobSpec)."""
    from pipeline.engine.settings import ConfigError
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else value
    return out


def read_overrides(text: str) -> dict[str, Any]:
    """An edit settings file (YAML, nested or dotted keys, e.g. the original's config.yml)
    as dotted keys; EditConfig.from_overrides checks them."""
    from pipeline.engine.settings import ConfigError
    from pipeline.store.uris import flatten
    data = yaml.safe_load(text) or {}
    if not isinstance(data, Mapping):
        raise ConfigError("an edit config file must hold a mapping of settings")
    return flatten(data)
