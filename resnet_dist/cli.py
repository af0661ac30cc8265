"""What the entry points share: KEY=VALUE arguments after the options, and one-line errors with exit codes."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from . import distributed


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


def folder_problem(folder: Path) -> str | None:
    """Why files cannot be written into `folder` (made when missing), or None: a part of it that is a file,
    or the deepest part that exists refusing a file (a nameless probe, gone at once). Creates nothing."""
    for part in [folder, *folder.parents]:
        if part.exists() and not part.is_dir():
            return f"{part} is a file, not a folder"
        if part.is_dir():
            try:
                with tempfile.TemporaryFile(dir=part):
                    pass
            except OSError as e:
                return f"cannot write in {part} ({e.strerror or type(e).__name__})"
            return None
    return None


def out_folder(text: str, what: str = "--out") -> Path:
    """An output folder argument: `~` expanded, absolute (what the tools then print), and usable, else exit 2
    with one line before anything is read or written."""
    folder = expand_path(text).absolute()
    problem = folder_problem(folder)
    if problem:
        usage_error(f"{what} {folder}: {problem}")
    return folder


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The parser's options plus `overrides` (KEY=VALUE ...), in any order."""
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=0.1"
    )
    argparse_error = parser.error

    def error(message: str) -> NoReturn:  # argparse's lines, from one process of a launch (usage_error)
        if not distributed.speaks():
            fail(message, 2, quiet=True)
        argparse_error(message)

    parser.error = error
    return parser.parse_intermixed_args(argv)


def user_path(text: str) -> str:
    """The `type=` of every path option: a leading `~` expanded, as the shell does not in `--out=~/x` (the
    config's path keys do the same: config.knob(path=True))."""
    return os.path.expanduser(text)


def first_line(e: BaseException) -> str:
    """An exception's message in one line for an error line: its first line (at most 200 characters), or its
    type's name when it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def fail(msg: str, code: int = 1, quiet: bool = False) -> NoReturn:
    """One line on stderr and exit `code`: 2 for usage, config and launch errors, 1 for run-time failures.
    `quiet`: exit without the line (the ranks other than 0, when rank 0 says it for all)."""
    if quiet:
        distributed.wait_for_launcher()
    else:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def usage_error(msg: str) -> NoReturn:
    """A mistake in the command line or config: one line and exit 2. Under a launcher, every rank hits it and
    rank 0 alone says it (distributed.speaks); the others exit 2 quietly."""
    fail(msg, 2, quiet=not distributed.speaks())


def launch_error(e: Exception) -> NoReturn:
    """A launch mistake (distributed.LaunchError): one line and exit 2, from the first process of each node,
    since it comes from that node's environment."""
    fail(str(e), 2, quiet=not distributed.speaks(per_node=True))
