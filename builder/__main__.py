"""`lymphatlas-build COMMAND ...` (or `python -m builder COMMAND ...`): the maintainers' pipeline.

Each command lives in ``builder/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import logging
import sys

from lymphatlas_ds.cli import dispatch

COMMANDS = {
    "synth": "write a synthetic PET/CT DICOM cohort with ground truth",
    "convert": "DICOM source -> aligned cases (WORK/cases/...)",
    "report": "static HTML QC report of a WORK folder",
    "release": "WORK -> versioned, split-aware release folder",
    "publish": "release folder -> local mirror and/or the Hugging Face Hub",
    "withdraw": "remove exams (withdrawn consent, deleted) and their cases from WORK",
}

QUIET_LOGGERS = ("highdicom", "openjpeg", "pylibjpeg", "libjpeg", "rle", "numexpr")
"""Loggers held at WARNING unless ``--verbose``."""


def main(argv: list[str] | None = None) -> int:
    return dispatch(
        argv,
        prog="lymphatlas-build" if sys.argv[0].endswith("lymphatlas-build") else "python -m builder",
        description="LymphAtlas dataset builder",
        package="builder.commands",
        commands=COMMANDS,
        level=logging.INFO,
        log_format="%(levelname)s %(name)s: %(message)s",
        # highdicom and the JPEG decoders log every SEG read and decoded frame at INFO; numexpr its thread count
        quiet_loggers=QUIET_LOGGERS,
    )


if __name__ == "__main__":
    sys.exit(main())
