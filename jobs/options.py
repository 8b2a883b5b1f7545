"""Command-line options that several commands share, defined once: storage options,
`--set KEY=VALUE` items and edit settings files."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

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
    """`--set a.b=v` items -> {'a.b': v}, each value read as YAML (`true`, `3`, `[a, b]`)
    through the bounded loader (no anchors or aliases, capped in size); what the value
    may be is the checked setting's business (EditConfig, JobSpec)."""
    from pipeline.engine.settings import ConfigError
    from pipeline.errors import clip
    from pipeline.store.documents import DocumentError, load_yaml
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set wants KEY=VALUE, got {clip(repr(item))}")
        try:
            out[key.strip()] = load_yaml(value, f"--set {key.strip()}") if value.strip() else value
        except DocumentError as e:
            raise ConfigError(str(e)) from None
    return out


def read_overrides(text: str | bytes, where: str = "edit config file") -> dict[str, Any]:
    """An edit settings file (YAML, nested or dotted keys, e.g. the original's config.yml)
    as dotted keys, read by the bounded loader (`where` names it in errors);
    EditConfig.from_overrides checks them."""
    from pipeline.engine.settings import ConfigError
    from pipeline.store.documents import DocumentError, load_yaml
    try:
        return _dotted(load_yaml(text, where), where)
    except DocumentError as e:
        raise ConfigError(str(e)) from None


def read_config_file(uri: str) -> dict[str, Any]:
    """`--config FILE` as `read_overrides`, the file read capped: one over MAX_SPEC_BYTES
    is refused from its size, before it is read."""
    from pipeline.engine.settings import ConfigError
    from pipeline.errors import MAX_ECHO
    from pipeline.store.documents import DocumentError, read_yaml
    from pipeline.store.uris import redact
    try:
        data = read_yaml(uri, what="edit config file")
    except DocumentError as e:
        raise ConfigError(str(e)) from None
    return _dotted(data, f"edit config file {redact(uri, MAX_ECHO)}")


def _dotted(data: Any, where: str) -> dict[str, Any]:
    from pipeline.engine.settings import ConfigError
    from pipeline.store.uris import flatten
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: an edit config file must hold a mapping of settings")
    return flatten(data)
