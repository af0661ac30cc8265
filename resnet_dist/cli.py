"""What the entry points share: KEY=VALUE arguments after the options, and one-line errors with exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from . import files, launchcheck
from .errors import RunError, UsageError
from .launchenv import LaunchError


def checkpoint_parser(module: str, doc: str, checkpoint_help: str, out_help: str) -> argparse.ArgumentParser:
    """The parser of a tool that reads one checkpoint (`--checkpoint`) and writes into a folder (`--out`)."""
    p = argparse.ArgumentParser(
        prog=f"python -m resnet_dist.{module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--out", help=out_help)
    return p


def expand_path(text: str) -> Path:
    """A path as the user gave it, with `~` expanded: a shell leaves `--out=~/x` and quoted paths alone."""
    return Path(os.path.expanduser(text))


def out_folder(text: str, what: str = "--out") -> Path:
    """An output folder argument: `~` expanded, absolute (what the tools then print), and usable, else
    UsageError before anything is read or written."""
    folder = expand_path(text).absolute()
    problem = files.folder_problem(folder)
    if problem:
        raise UsageError(f"{what} {folder}: {problem}")
    return folder


def checkpoint_file(text: str) -> Path:
    """A --checkpoint argument: `~` expanded, and a file, else UsageError."""
    path = expand_path(text)
    if not path.is_file():
        raise UsageError(f"no checkpoint file at {path}")
    return path


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The parser's options plus `overrides` (KEY=VALUE ...), in any order."""
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=0.1"
    )
    argparse_error = parser.error

    def error(message: str) -> NoReturn:  # argparse's lines, from one process of a launch (see report)
        if not launchcheck.speaks():
            launchcheck.wait_for_launcher()
            sys.exit(2)
        argparse_error(message)

    parser.error = error
    return parser.parse_intermixed_args(argv)


def setup_logging(is_main: bool) -> None:
    """The package's one console (resnet_dist/__init__.py), once the rank is known: rank 0 says everything,
    the other ranks only their errors."""
    logging.getLogger("resnet_dist").setLevel(logging.INFO if is_main else logging.ERROR)


def report(e: UsageError | RunError, env=None) -> int:
    """The one line of a UsageError or RunError, said once; its exit code. Before the process group exists
    (`env` None) every process of a launch meets the same error: one says it (launchcheck.speaks) and the
    others wait for the launcher to stop them. Afterwards rank 0 says an error every rank holds
    (`every_rank`), and each rank its own."""
    if env is None:
        speaks = launchcheck.speaks(per_node=isinstance(e, LaunchError))
    else:
        speaks = env.is_main or not e.every_rank
    if speaks:
        print(f"error: {e}", file=sys.stderr, flush=True)
    elif env is None:
        launchcheck.wait_for_launcher()
    return e.exit_code
