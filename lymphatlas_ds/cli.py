"""`lymphatlas COMMAND ...`: the users' command line.

Each command lives in ``lymphatlas_ds/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``. Errors of the LymphAtlasError family are
printed as one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lymphatlas_ds.errors import LymphAtlasError

COMMANDS = {
    "info": "versions, configs, splits, case counts and statistics of a release",
    "verify": "check every file of a release against its manifest (size, sha256)",
    "materialize": "write an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json, splits_final.json)",
    "show": "render one case (three views, PET MIP, fusion, label outline) to a PNG",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lymphatlas", description="LymphAtlas PET/CT dataset tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"lymphatlas_ds.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not there yet
            if e.name != f"lymphatlas_ds.commands.{name}":
                raise
            continue
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(modules[args.command].run(args) or 0)
    except LymphAtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
