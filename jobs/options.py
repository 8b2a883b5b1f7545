"""Command-line options that several commands share, defined once."""
from __future__ import annotations

import json

STORAGE_OPTIONS_HELP = ('fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": '
                        '"..."}}\'; credentials come from the environment, never from here')


def add_storage_options(parser) -> None:
    parser.add_argument("--storage-options", metavar="JSON", help=STORAGE_OPTIONS_HELP)


def storage_options(args) -> dict:
    """--storage-options as a dict: a JSON object without credentials (ValueError)."""
    from pipeline.job.storage import refuse_credentials
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
