"""`maskface`: the command line. One module per command (COMMAND_MODULES); each parses its
arguments, calls the library and prints. Library code only logs.

    maskface weights make-tiny --dest DIR [--resolution 64]
    maskface weights fetch --dest DIR [--only NAME ...] [--generator URI]
    maskface weights convert stylegan2-ffhq-config-f.pkl --dest stylegan2-ffhq-config-f.pt
    maskface weights check SPEC
    maskface run JOB.yaml [--set key=value] [--retry-errors]
    maskface status OUTPUT_URI [--manifest URI] [--watch SECONDS] [--json]
    maskface report OUTPUT_URI [--dest URI]
    maskface export OUTPUT_URI --format hf-parquet|imagefolder --dest URI [--only-successful]
    maskface manifest celebahq --images DIR --attr-file FILE --edit smiling=flip --out URI
    maskface align IN_URI OUT_URI [--size 1024]; maskface paste --edited --source --quad --out
    maskface edit IMAGE... --attribute smiling=1 --models SPEC --out DIR
    maskface bench [--resolution 64 256] [--batch 1 4]
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from models.checkpoints import CheckpointError
from models.spec import SpecError
from pipeline.errors import MAX_MESSAGE, clip, clip_message

# Each command's module. A command line that names one imports only that module, so
# `maskface status` starts without torch; --help lists every command.
COMMAND_MODULES = {"weights": "weights", "run": "run", "status": "status", "report": "report",
                   "export": "export", "manifest": "manifest_cmd", "align": "align_cmd",
                   "paste": "align_cmd", "edit": "edit", "bench": "bench"}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its usage errors clipped: they quote the argument given (`invalid
    choice: '...'`), and a hostile one must not make a megabyte-long line. Subcommands'
    parsers are of the same class (argparse makes them of their parent's)."""

    def error(self, message: str):
        # room left for argparse's own `maskface manifest celebahq: error: ` before it
        super().error(clip(message, MAX_MESSAGE - 200))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="maskface", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    named = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")),
                 None)
    wanted = [COMMAND_MODULES[named]] if named in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(wanted):
        importlib.import_module(f"jobs.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # every command's log records pass through tqdm, so a line never breaks a bar
        with logging_redirect_tqdm():
            return args.func(args)
    except (CheckpointError, SpecError, ValueError) as e:
        print(clip_message(f"error: {e}"), file=sys.stderr)
        return 1
    except Exception as e:  # download errors and the like: one line, not a traceback
        if args.verbose:
            raise
        print(clip_message(f"error: {type(e).__name__}: {e}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
