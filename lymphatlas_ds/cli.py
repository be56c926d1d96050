"""`lymphatlas COMMAND ...`: the users' command line.

Each command lives in ``lymphatlas_ds/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``. Errors of the LymphAtlasError family are
printed as one clear line and exit with status 2, and so is a missing optional package (the builder's
extra, torch: what to install). :func:`dispatch` also serves the maintainers'
``python -m builder``.

Manners: an unknown option of a command is reported with that command's usage; output cut short by
a closed pipe (``lymphatlas info ... | head -1``) ends quietly with status 141 (128 + SIGPIPE, what
the shell reports for any command a pipe closes on).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Mapping

from lymphatlas_ds.errors import LymphAtlasError

COMMANDS = {
    "info": "versions, configs, splits, case counts and statistics of a release",
    "verify": "check every file of a release against its manifest (size, sha256)",
    "materialize": "write an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json, splits_final.json)",
    "show": "render one case (three views, PET MIP, fusion, label outline) to a PNG",
    "evaluate": "a model's predictions against the release's labels: Tables 2-3, lesion-level metrics, report",
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
    lines would drown the pipeline's own). A closed stdout (``... | head -1``), met while running or
    at the final flush (``--help`` included), ends quietly with status 141.
    """
    try:
        try:
            return _dispatch(argv, prog=prog, description=description, package=package, commands=commands,
                             level=level, log_format=log_format, quiet_loggers=quiet_loggers)
        finally:  # on return and on argparse's exit alike: a closed pipe shows here, not at the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()


def _parser(prog: str, description: str, package: str, commands: Mapping[str, str]) -> tuple:
    """The top-level parser, each command's parser and module."""
    from lymphatlas_ds import __version__
    from lymphatlas_ds.schema import SCHEMA_VERSION

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (release schema {SCHEMA_VERSION})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules, parsers = {}, {}
    for name, help_text in commands.items():
        modules[name] = importlib.import_module(f"{package}.{name}")
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        modules[name].add_arguments(parsers[name])
    return parser, parsers, modules


def _dispatch(argv: list[str] | None, *, prog: str, description: str, package: str, commands: Mapping[str, str],
              level: int, log_format: str, quiet_loggers: tuple[str, ...]) -> int:
    parser, parsers, modules = _parser(prog, description, package, commands)
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's own usage, not the top-level one (argparse's default)
        parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else level, format=log_format)
    if not args.verbose:
        for name in quiet_loggers:
            logging.getLogger(name).setLevel(max(level, logging.WARNING))
    try:
        return int(modules[args.command].run(args) or 0)
    except LymphAtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package of another role (the builder's, torch): say what to install
        if not e.name or e.name.split(".")[0] in ("lymphatlas_ds", "builder", "lymphatlas_synth"):
            raise
        from lymphatlas_ds._optional import missing

        print(f"error: {missing(e.name, f'{prog} {args.command}')}", file=sys.stderr)
        return 2


def _closed_pipe() -> int:
    """The reader of stdout went away: drop what is left unwritten, exit with the shell's status for SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush then writes nowhere, quietly
    os.close(devnull)
    return 128 + 13


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
