"""Files the package writes: whole or not at all (atomic_write), and whether a folder can take them."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write, tmp: Path | None = None) -> Path:
    """`write(tmp)`, then fsync it and rename it over `path`: a reader (or a crash) sees the old file or the
    new one, never half of one; a failed write leaves no temporary behind. The temporary is
    `.<name>.tmp-<pid>` (no suffix a reader looks for: a checkpoint's .pt) unless `tmp` names another. It gets
    the permissions a plain open() would give (some writers create their files 0600)."""
    tmp = tmp or path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def folder_problem(target: Path) -> str | None:
    """Why files cannot be written into the folder `target` (made later where missing), or None: every existing
    part of it is a folder, each missing part's name fits the filesystem, and the deepest existing part takes a
    file (a probe, removed at once). Creates nothing."""
    missing = []
    for part in [target, *target.parents]:
        try:
            exists = part.exists()
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:  # a name too long is said below, with the limit
                return f"cannot look at {part} ({e.strerror})"
            exists = False
        if not exists:
            missing.append(part.name)
            continue
        if not part.is_dir():
            return f"{part} is a file, not a folder"
        limit = name_max(part)
        for name in missing:
            if len(os.fsencode(name)) > limit:
                return (
                    f"the folder name '{name[:20]}...' is {len(os.fsencode(name))} bytes long; the filesystem "
                    f"of {part} takes names of at most {limit}"
                )
        try:
            with tempfile.TemporaryFile(dir=part):
                pass
        except OSError as e:
            return f"cannot write in {part} ({e.strerror})"
        return None
    return None


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
