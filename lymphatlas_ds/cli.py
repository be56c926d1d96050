"""`lymphatlas COMMAND ...`: the users' command line.

Each command lives in ``lymphatlas_ds/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``. Errors of the LymphAtlasError family are
printed as one clear line and exit with status 2. :func:`dispatch` also serves the maintainers'
``python -m builder``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Mapping

from lymphatlas_ds.errors import LymphAtlasError

COMMANDS = {
    "info": "versions, configs, splits, case counts and statistics of a release",
    "verify": "check every file of a release against its manifest (size, sha256)",
    "materialize": "write an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json, splits_final.json)",
    "show": "render one case (three views, PET MIP, fusion, label outline) to a PNG",
}


def dispatch(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    package: str,
    commands: Mapping[str, str],
    level: int,
    log_format: str,
    quiet_loggers: tuple[str, ...] = (),
) -> int:
    """Parse ``argv``, run ``<package>.<command>.run(args)`` and turn LymphAtlasError into exit status 2.

    ``quiet_loggers``: other libraries' loggers held at WARNING unless ``--verbose`` (their INFO
    lines would drown the pipeline's own).
    """
    from lymphatlas_ds import __version__
    from lymphatlas_ds.schema import SCHEMA_VERSION

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (release schema {SCHEMA_VERSION})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, help_text in commands.items():
        modules[name] = importlib.import_module(f"{package}.{name}")
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else level, format=log_format)
    if not args.verbose:
        for name in quiet_loggers:
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
    try:
        return int(modules[args.command].run(args) or 0)
    except LymphAtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch(
        argv,
        prog="lymphatlas",
        description="LymphAtlas PET/CT dataset tools",
        package="lymphatlas_ds.commands",
        commands=COMMANDS,
        level=logging.WARNING,
        log_format="%(levelname)s: %(message)s",
    )


if __name__ == "__main__":
    sys.exit(main())
