"""The two kinds of failure, and the exit code each means. Every error of this package derives from one of them;
the entry points catch these two and print their one line.

UsageError (exit 2): the command, its config, its launch or its inputs are wrong; found before anything is
created, so nothing was trained or written. RunError (exit 1): the run failed while it ran (a full disk, a
diverged loss, a capture that disagrees).

`every_rank`: every rank holds the same error (a decision rank 0 made for all, or a value all ranks computed):
rank 0 alone says it. Otherwise the rank that met it says it.
"""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """An exception's message for a one-line report: its first line (at most 200 characters), or its type's
    name when it has none."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


class UsageError(Exception):
    exit_code = 2
    every_rank = False


class RunError(Exception):
    exit_code = 1
    every_rank = False


class ConfigError(UsageError):
    """A usage error in the config: unknown key, wrong type or invalid value (exit 2)."""

    every_rank = True  # every rank reads the same config
