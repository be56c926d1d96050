"""`python -m builder COMMAND ...`: the maintainers' pipeline.

Each command lives in ``builder/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lymphatlas_ds.errors import LymphAtlasError

COMMANDS = {
    "synth": "write a synthetic PET/CT DICOM cohort with ground truth",
    "convert": "DICOM source -> aligned cases (WORK/cases/...)",
    "report": "static HTML QC report of a WORK folder",
    "release": "WORK -> versioned, split-aware release folder",
    "publish": "release folder -> local mirror and/or the Hugging Face Hub",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m builder", description="LymphAtlas dataset builder")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"builder.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not there yet
            if e.name != f"builder.commands.{name}":
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(modules[args.command].run(args) or 0)
    except LymphAtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
