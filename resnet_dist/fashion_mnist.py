"""Fashion-MNIST on disk: the four published files prepared once per filesystem (under the project's lock, checked
against their MD5s on every start, renamed into place whole), and read as uint8 tensors."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import signal
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import lock
from .errors import UsageError
from .files import folder_problem

log = logging.getLogger(__name__)


DEBIAN_MIRROR = "/usr/share/datasets/fashion-mnist"


# MD5 of the DECOMPRESSED files: Debian recompressed the .gz files, the IDX content is the original.
FILES = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


MEAN, STD = 0.2860, 0.3530


IMAGE_SIZE = 28  # the images are 28x28 pixels; data.resize up-samples them


class DataError(UsageError):
    """The dataset cannot be prepared or is corrupt."""


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(tmp: Path, mirror: str | None) -> str:
    """Fill `tmp` with the four decompressed files; returns where they came from."""
    if mirror is None and os.path.isdir(DEBIAN_MIRROR):
        mirror = DEBIAN_MIRROR
    if mirror is not None:
        for name in FILES:
            src = Path(mirror) / f"{name}.gz"
            if not src.is_file():
                raise DataError(f"data.mirror {mirror} lacks {src.name}")
            try:
                with gzip.open(src, "rb") as fin, open(tmp / name, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                raise DataError(
                    f"{src} is not a readable gzip file ({e or type(e).__name__}): a damaged or "
                    "wrong copy; replace it with the original"
                ) from None
        return mirror
    from torchvision.datasets import FashionMNIST  # downloads and decompresses into tmp/FashionMNIST/raw

    try:
        FashionMNIST(str(tmp / "dl"), train=True, download=True)
        FashionMNIST(str(tmp / "dl"), train=False, download=True)
    except Exception as e:  # noqa: BLE001 - any network failure ends the same way
        raise DataError(
            f"no data.mirror and the download failed ({e}); set data.mirror to a folder "
            "with the four Fashion-MNIST .gz files"
        ) from None
    for name in FILES:
        os.replace(tmp / "dl" / "FashionMNIST" / "raw" / name, tmp / name)
    shutil.rmtree(tmp / "dl")
    return "download"


def prepare(root: str, mirror: str | None = None) -> Path:
    """Make `root/FashionMNIST/raw` hold the four published files and check them (MD5, every call: ~0.07 s
    for the 55 MB); exactly one process prepares them, under the project's lock. A SIGTERM while preparing
    leaves nothing behind (exit 143); what a killed preparer left is removed by the next one.

    Layout is torchvision's, so `torchvision.datasets.FashionMNIST(root)` reads the same files.
    """
    raw = Path(root) / "FashionMNIST" / "raw"
    try:
        if not _prepared(raw):
            check_root(root)
            raw.parent.mkdir(parents=True, exist_ok=True)
            with (
                stopped_by_sigterm(),
                lock.Lock(raw.parent / ".prepare.lock").acquire(wait=True, timeout_s=1800),
            ):
                if not _prepared(raw):  # else another process did it while we waited
                    _prepare_locked(raw, mirror)
        for name, want in FILES.items():
            if md5(raw / name) != want:
                raise DataError(
                    f"data.root {root}: {name} is not the published file (its MD5 differs): the prepared data "
                    f"is damaged; delete {raw.parent} and run again to prepare it anew"
                )
    except lock.LockError as e:
        raise DataError(f"data.root {root}: {e}") from None
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise DataError(f"data.root {root} is not usable: {e.strerror or e}{where}") from None
    return raw


def check_root(root: str) -> None:
    """data.root holds the prepared data, or is a folder it can be prepared in (made when missing); else
    DataError in one line naming the key. Creates nothing: the entry points call it before any other work."""
    raw = Path(root) / "FashionMNIST" / "raw"
    problem = None if _prepared(raw) else folder_problem(raw.parent)
    if problem:
        raise DataError(f"data.root {root} cannot hold the data: {problem}; choose another data.root")


def _prepared(raw: Path) -> bool:
    try:
        return all((raw / n).is_file() for n in FILES)
    except OSError:  # a name too long for the filesystem: folder_problem says so
        return False


def _prepare_locked(raw: Path, mirror: str | None) -> None:
    """Under the lock: clear what killed preparers left, fetch into a temporary folder, check, rename."""
    for old in raw.parent.glob(".raw-*"):  # the lock is ours: these are not being written, unless by a
        host, _, pid = old.name[len(".raw-") :].rpartition("-")  # live process of an older version
        if not (host == lock.HOST and pid.isdigit() and lock.started(int(pid)) is not None):
            shutil.rmtree(old, ignore_errors=True)
    tmp = raw.parent / f".raw-{lock.HOST}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        source = _fetch(tmp, mirror)
        for name, want in FILES.items():
            if md5(tmp / name) != want:
                raise DataError(f"{name} from {source} has the wrong MD5 (expected {want}): corrupt copy")
        if raw.exists():  # an incomplete folder from elsewhere: keep it aside, never delete user files
            os.replace(raw, raw.parent / f"raw.incomplete-{int(time.time())}")
        os.replace(tmp, raw)  # atomic: readers see nothing or everything
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Stop(BaseException):
    """SIGTERM while preparing: a BaseException, so that no `except Exception` on the way swallows it."""


@contextmanager
def stopped_by_sigterm():
    """SIGTERM while preparing unwinds (the temporary folder and the lock go), says one line and exits with
    the conventional 128 + 15. Outside the main thread signals cannot be caught: nothing changes there."""

    def stop(signum, frame):
        raise _Stop

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:
        yield
        return
    try:
        yield
    except _Stop:
        log.error("stopped by SIGTERM while preparing the data; nothing was kept")
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_idx(path: Path) -> np.ndarray:
    data = path.read_bytes()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated")
    return arr.reshape(shape)


def load_split(raw: Path, split: str, subset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of the first `subset` images of a split."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte")
    n = len(labels) if subset is None else min(subset, len(labels))
    return (torch.from_numpy(images[:n].copy()).unsqueeze(1), torch.from_numpy(labels[:n].astype(np.int64)))
