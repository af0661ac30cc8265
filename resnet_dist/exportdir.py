"""The export folder: built beside its place, swapped in whole, never over files an export did not write.

An export (`python -m resnet_dist.export`, or training's W&B model artifact) is written into a fresh folder
next to its target, `.<name>.export-<host>-<pid>`, and checked there; then it replaces the target with two
renames (the previous export goes aside as `.<name>.old-<host>-<pid>` for the instant between them, and is
deleted after). A failure or a kill at any moment leaves the previous export as it was. The next export
removes what a killed one left on this host, and puts an export that was set aside back in place if the
kill fell between the two renames.

A folder is replaced only when it is empty or holds an export of ours and nothing else: its model.json (of
this format) lists the files that export wrote. Any other file in it is refused, never deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "resnet_dist export 1"  # model.json's "format"
# a file being written (atomic_write's temporary): left behind only by a killed export, of this or an earlier
# version (which wrote into the folder itself)
PARTIAL = re.compile(r"\.tmp-\d+-model\.(json|safetensors|onnx)$")


class ExportDirError(RuntimeError):
    """The folder holds files an export did not write: exit 2, nothing written."""


def written_by_export(folder: Path) -> set[str] | None:
    """The files the export in `folder` wrote, from its model.json; None when it has no model.json of ours."""
    try:
        card = json.loads((folder / "model.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        return None
    files = card.get("files")
    if files is None:  # an export from before the list: what it may have written
        files = ["model.json", "model.safetensors"] + (["model.onnx"] if card.get("onnx") else [])
    return set(files) if isinstance(files, list) else None


def check_replaceable(folder: Path) -> None:
    """ExportDirError in one line when replacing `folder` would lose a file an export did not write."""
    if not folder.is_dir():
        return
    names = sorted(p.name for p in folder.iterdir())
    ours = written_by_export(folder)
    foreign = [n for n in names if n not in (ours or ()) and not PARTIAL.match(n)]
    if not foreign:
        return
    listed = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
    what = "no model.json of an export" if ours is None else "files its export did not write"
    raise ExportDirError(
        f"{folder} holds {what} ({listed}): an export replaces its folder whole, so it writes only into a "
        "new or empty folder or over an earlier export; move those files or choose another --out"
    )


def _host_pid_leftovers(out: Path, kind: str) -> list[Path]:
    """`.<name>.<kind>-<this host>-<pid>` folders beside `out` whose process is gone."""
    prefix = f".{out.name}.{kind}-{socket.gethostname()}-"
    if not out.parent.is_dir():
        return []
    found = []
    for p in out.parent.iterdir():
        pid = p.name[len(prefix) :]
        if p.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            found.append(p)
    return sorted(found)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier export of this very process, which ended
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Undo what a killed export left beside `out`; one line per thing done."""
    said = []
    for old in _host_pid_leftovers(out, "old"):
        if not out.exists():
            os.rename(old, out)
            said.append(
                f"note: {out}: put back the previous export (set aside by an export killed while swapping)"
            )
        else:
            shutil.rmtree(old, ignore_errors=True)
            said.append(f"note: removed {old} (the previous export of an export killed while swapping)")
    for tmp in _host_pid_leftovers(out, "export"):
        shutil.rmtree(tmp, ignore_errors=True)
        said.append(f"note: removed {tmp} (the unfinished folder of an export that was killed)")
    return said


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap(new: Path, out: Path) -> None:
    """`new` becomes `out`; the previous `out` is deleted only once `new` is in its place."""
    _fsync_dir(new)
    if out.exists():
        check_replaceable(out)  # again, just before: a file put there meanwhile is not lost
        old = out.with_name(f".{out.name}.old-{socket.gethostname()}-{os.getpid()}")
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
    """A fresh empty folder beside `out` to write the export into; when the block ends without an error it
    replaces `out` whole. On an error `out` stays as it was and the new folder is removed (after a kill: by
    the next export). ExportDirError before anything is written when `out` holds foreign files."""
    out = Path(os.path.realpath(out))  # a symlink to the folder: replace its target, keep the link
    for line in clean_stale(out):
        print(line, flush=True)
    check_replaceable(out)
    new = out.with_name(f".{out.name}.export-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        yield new
        _swap(new, out)
    finally:
        shutil.rmtree(new, ignore_errors=True)
