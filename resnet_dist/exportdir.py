"""The export folder: built beside its place, swapped in whole, never over files an export did not write.

An export is written into a fresh folder beside its target, `.<name>.export-<host>-<pid>`, and checked there;
two renames then put it in place (the previous export waits as `.<name>.old-<host>-<pid>` between them and is
deleted after). A failure or a kill at any moment leaves the previous export as it was; the next export on
this host removes what a killed one left, and puts back an export a kill left aside between the renames.
A folder is replaced only when it is empty or holds an export and nothing else: the files its model.json
lists. Any other file is refused, never deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

log = logging.getLogger(__name__)

FORMAT = "resnet_dist export 2"  # model.json's "format"; any version's "files" says what it wrote


class ExportDirError(UsageError):
    """The folder holds files an export did not write: exit 2, nothing written."""


def written_by_export(folder: Path) -> set[str] | None:
    """The files the export in `folder` wrote, from its model.json; None when it has no model.json of ours."""
    try:
        card = json.loads((folder / "model.json").read_text())
        if card["format"].startswith("resnet_dist export ") and isinstance(card["files"], list):
            return set(card["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def check_replaceable(folder: Path) -> None:
    """ExportDirError in one line when replacing `folder` would lose a file an export did not write."""
    if not folder.is_dir():
        return
    ours = written_by_export(folder)
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in (ours or ()))
    if not foreign:
        return
    listed = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
    what = "no model.json of an export" if ours is None else "files its export did not write"
    raise ExportDirError(
        f"{folder} holds {what} ({listed}): an export replaces its folder whole, so it writes only into a "
        "new or empty folder or over an earlier export; move those files or choose another --out"
    )


def beside(out: Path, kind: str, pid: int | str = "") -> Path:
    """`.<name>.<kind>-<host>-<pid>`: the new export (kind "export") or the previous one set aside ("old")."""
    return out.with_name(f".{out.name}.{kind}-{socket.gethostname()}-{pid}")


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (this very process: an earlier export of it, which ended)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale(out: Path, kind: str) -> list[Path]:
    """The `beside(out, kind, pid)` folders of this host whose process has ended."""
    prefix = beside(out, kind).name
    pids = {p: p.name[len(prefix) :] for p in out.parent.glob(".*") if p.name.startswith(prefix)}
    return sorted(p for p, pid in pids.items() if pid.isdigit() and gone(int(pid)))


def clean_stale(out: Path) -> list[str]:
    """Undo what a killed export on this host left beside `out`; one line per thing done."""
    said = []
    for old in stale(out, "old"):
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"note: removed {old} (the previous export of an export killed while swapping)")
        else:
            os.rename(old, out)
            said.append(
                f"note: {out}: put back the previous export (set aside by an export killed while swapping)"
            )
    for new in stale(out, "export"):
        shutil.rmtree(new, ignore_errors=True)
        said.append(f"note: removed {new} (the unfinished folder of an export that was killed)")
    return said


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(new: Path, out: Path) -> None:
    """`new` becomes `out`; the previous `out` is deleted only once `new` is in its place."""
    if out.exists():
        check_replaceable(out)  # again, just before: a file put there meanwhile is not lost
        old = beside(out, "old", os.getpid())
        os.rename(out, old)
        try:
            os.rename(new, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old)
    else:
        os.rename(new, out)
    _fsync_dir(out.parent)


@contextmanager
def replaced(out: Path) -> Iterator[Path]:
    """A fresh empty folder beside `out` to write the export into (each file written atomically, so durable);
    when the block ends without an error it replaces `out` whole. On an error `out` stays as it was and the new
    folder is removed (after a kill: by the next export). ExportDirError before anything is written when `out`
    holds foreign files."""
    out = Path(os.path.realpath(out))  # a symlink to the folder: replace its target, keep the link
    for line in clean_stale(out):
        log.info(line)
    check_replaceable(out)
    new = beside(out, "export", os.getpid())
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        yield new
        _swap(new, out)
    finally:
        shutil.rmtree(new, ignore_errors=True)
