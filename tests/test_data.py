import contextlib
import gzip
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from torch.utils.data import DistributedSampler

from resnet_dist import data, fashion_mnist
from resnet_dist.config import DataConfig
from resnet_dist.lock import HOST

from .helpers import PY, REPO, clean_env, tmpfs


def test_prepared_files_are_the_published_ones(data_root):
    raw = data_root / "FashionMNIST" / "raw"
    for name, want in fashion_mnist.FILES.items():
        assert fashion_mnist.md5(raw / name) == want
    x, y = fashion_mnist.load_split(raw, "train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = fashion_mnist.load_split(raw, "test", subset=123)
    assert xt.shape == (123, 1, 28, 28) and yt.shape == (123,)


def test_torchvision_reads_the_same_layout(data_root):
    from torchvision.datasets import FashionMNIST

    ds = FashionMNIST(str(data_root), train=False, download=False)
    x, y = fashion_mnist.load_split(data_root / "FashionMNIST" / "raw", "test")
    assert torch.equal(ds.data, x[:, 0]) and torch.equal(ds.targets, y)


def _mirror_with(tmp_path, corrupt: bool):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in fashion_mnist.FILES:
        shutil.copy(f"{fashion_mnist.DEBIAN_MIRROR}/{name}.gz", mirror / f"{name}.gz")
    if corrupt:
        with gzip.open(mirror / "t10k-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + b"\x00" * 100)
    return mirror


def test_corrupt_mirror_is_refused_and_leaves_nothing(tmp_path):
    mirror = _mirror_with(tmp_path, corrupt=True)
    with pytest.raises(fashion_mnist.DataError, match="wrong MD5"):
        fashion_mnist.prepare(str(tmp_path / "root"), str(mirror))
    assert not (tmp_path / "root" / "FashionMNIST" / "raw").exists()
    assert [p.name for p in (tmp_path / "root" / "FashionMNIST").iterdir()] == []  # no temp dir, no lock left


def test_missing_mirror_file_is_one_clear_error(tmp_path):
    mirror = _mirror_with(tmp_path, corrupt=False)
    (mirror / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(fashion_mnist.DataError, match="lacks train-images"):
        fashion_mnist.prepare(str(tmp_path / "root"), str(mirror))


def _prepare_worker(root, mirror, barrier, out):
    barrier.wait()
    try:
        out.put(str(fashion_mnist.prepare(root, mirror)))
    except Exception as e:  # noqa: BLE001
        out.put(f"error {e}")


@pytest.mark.processes
def test_concurrent_prepare_leaves_one_intact_copy(tmp_path):
    mirror = _mirror_with(tmp_path, corrupt=False)
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_prepare_worker, args=(str(tmp_path / "root"), str(mirror), barrier, out))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert results == [str(raw)] * 3
    assert sorted(p.name for p in raw.iterdir()) == sorted(fashion_mnist.FILES)
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]  # no second copy, temp dir or lock left
    for name, want in fashion_mnist.FILES.items():
        assert fashion_mnist.md5(raw / name) == want


def test_a_lock_left_by_a_dead_preparer_on_another_host_is_broken_saying_so(tmp_path, capsys):
    mirror = _mirror_with(tmp_path, corrupt=False)
    folder = tmp_path / "root" / "FashionMNIST"
    folder.mkdir(parents=True)
    (folder / ".prepare.lock").write_text("old-container pid 7 since 2025-01-01 00:00:00 start 99\n")
    os.utime(folder / ".prepare.lock", (time.time() - 3600,) * 2)  # a restarted container's
    t0 = time.monotonic()
    fashion_mnist.prepare(str(tmp_path / "root"), str(mirror))
    assert time.monotonic() - t0 < 30  # not the half hour of waiting it used to be
    assert "removed the lock" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["raw"]


SLOW_PREPARE = """
import shutil, sys, time
from resnet_dist import data, fashion_mnist
copy = shutil.copyfileobj
def slow(*args):  # a slow mirror: the first file copied, then a long wait
    copy(*args)
    print("copying", flush=True)
    time.sleep(120)
shutil.copyfileobj = slow
fashion_mnist.prepare(sys.argv[1], sys.argv[2])
"""


@pytest.mark.processes
def test_a_signal_while_preparing_keeps_nothing_and_the_next_preparation_clears_a_killed_ones_files(tmp_path):
    mirror, root = _mirror_with(tmp_path, corrupt=False), tmp_path / "root"
    folder = root / "FashionMNIST"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            [PY, "-c", SLOW_PREPARE, str(root), str(mirror)],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "copying"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert proc.returncode == 143
            assert err.strip().splitlines() == [
                "error: stopped by SIGTERM while preparing the data; nothing was kept"
            ]
            assert list(folder.iterdir()) == []
    leftovers = sorted(p.name for p in folder.iterdir())
    assert leftovers == [".prepare.lock", f".raw-{HOST}-{proc.pid}"]  # SIGKILL: nothing could clean up
    live = subprocess.Popen(["sleep", "60"])  # a temporary of a live process here is not touched
    (folder / f".raw-{HOST}-{live.pid}").mkdir()
    (folder / ".raw-gone-host-12").mkdir()
    try:
        fashion_mnist.prepare(str(root), str(mirror))
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in folder.iterdir()) == [f".raw-{HOST}-{live.pid}", "raw"]


DAMAGE = {  # (file, offset of the first byte changed, how): what a disk, a tool or a hand can do to a copy
    "inverted training images": (
        "train-images-idx3-ubyte",
        16 + 28 * 28 * 5,
        lambda b: bytes(255 - x for x in b),
    ),
    "200 test labels shifted": ("t10k-labels-idx1-ubyte", 8, lambda b: b[1:] + b[:1]),
    "a label of 200": ("train-labels-idx1-ubyte", 8 + 77, lambda b: bytes([200]) + b[1:]),
    "a truncated file": ("t10k-images-idx3-ubyte", None, None),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_prepared_root_is_refused_saying_how_to_rebuild_it(tmp_path, data_root, damage):
    root = tmp_path / "copy"
    shutil.copytree(data_root, root)
    name, offset, how = DAMAGE[damage]
    path = root / "FashionMNIST" / "raw" / name
    content = path.read_bytes()
    if how is None:
        path.write_bytes(content[:-100])
    else:
        path.write_bytes(content[:offset] + how(content[offset : offset + 200]) + content[offset + 200 :])
    with pytest.raises(fashion_mnist.DataError) as e:
        fashion_mnist.prepare(str(root))
    assert str(e.value) == (
        f"data.root {root}: {name} is not the published file (its MD5 differs): the prepared data is damaged; "
        f"delete {root / 'FashionMNIST'} and run again to prepare it anew"
    )


@pytest.mark.parametrize("kind", ["a file", "under /proc", "name too long", "a read-only filesystem"])
def test_an_unusable_data_root_is_one_line_naming_it(tmp_path, kind):
    root = {
        "a file": tmp_path / "afile",
        "under /proc": "/proc/resnet_dist/data",
        "name too long": tmp_path / ("n" * 300),
        "a read-only filesystem": tmp_path / "ro" / "data",
    }[kind]
    (tmp_path / "afile").write_text("x")
    with contextlib.ExitStack() as stack:
        if kind == "a read-only filesystem":
            stack.enter_context(tmpfs(tmp_path / "ro", "size=1m,ro"))
        with pytest.raises(fashion_mnist.DataError) as e:
            fashion_mnist.prepare(str(root))
    msg = str(e.value)
    assert msg.startswith(f"data.root {root} ") and "\n" not in msg
    assert {
        "a file": "is a file, not a folder",
        "under /proc": "cannot write in /proc",
        "name too long": "is 300 bytes long",
        "a read-only filesystem": "Read-only file system",
    }[kind] in msg


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_train_shards_disjoint_covering_and_seeded(world):
    n, seed, epoch = 1000, 7, 3
    shards = []
    for rank in range(world):
        s = DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        s.set_epoch(epoch)
        shards.append(list(s))
    flat = [i for sh in shards for i in sh]
    assert (
        len(flat) == len(set(flat)) == (n // world) * world
    )  # disjoint, equal sizes, drop_last drops < world
    again = DistributedSampler(range(n), num_replicas=world, rank=0, shuffle=True, seed=seed, drop_last=True)
    again.set_epoch(epoch)
    assert list(again) == shards[0]  # the same permutation for a seed and an epoch, in any process
    again.set_epoch(epoch + 1)
    assert list(again) != shards[0]


def test_train_batches_cover_each_rank_shard_per_epoch(data_root):
    raw = data_root / "FashionMNIST" / "raw"
    x, y = fashion_mnist.load_split(raw, "train", subset=600)
    seen = []
    for rank in range(2):
        tb = data.TrainBatches(x, y, 50, rank, 2, seed=1, cfg=DataConfig())
        assert tb.steps_per_epoch == 6
        seen += [yb for _, yb in tb.epoch(0, torch.Generator().manual_seed(0))]
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.sort(y).values)
    # resuming at step 4 yields exactly the last two batches of the uninterrupted epoch
    tb = data.TrainBatches(x, y, 50, 0, 2, seed=1, cfg=DataConfig())
    full = [yb for _, yb in tb.epoch(0, torch.Generator())]
    tail = [yb for _, yb in tb.epoch(0, torch.Generator(), start_step=4)]
    assert len(tail) == 2 and all(torch.equal(a, b) for a, b in zip(full[4:], tail))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_eval_shards_cover_exactly_once(world):
    for n in (999, 1000, 10000, 5):
        idx = [i for r in range(world) for i in range(n)[data.eval_shard(n, r, world)]]
        assert idx == list(range(n))


def test_augment_is_batched_seeded_and_label_preserving_in_shape():
    x = torch.randn(64, 1, 28, 28)
    a = data.augment(x, torch.Generator().manual_seed(0), padding=4, flip=True, erasing=0.5)
    b = data.augment(x, torch.Generator().manual_seed(0), padding=4, flip=True, erasing=0.5)
    c = data.augment(x, torch.Generator().manual_seed(1), padding=4, flip=True, erasing=0.5)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(data.augment(x, torch.Generator(), 0, False, 0.0), x)


def test_crop_is_a_shift_of_the_padded_image():
    x = torch.arange(2 * 5 * 5, dtype=torch.float).view(2, 1, 5, 5)
    out = data.augment(x, torch.Generator().manual_seed(3), padding=2, flip=False, erasing=0.0)
    fill = (0.0 - fashion_mnist.MEAN) / fashion_mnist.STD
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=fill)
    for i in range(2):  # each output is some 5x5 window of its own padded image
        windows = [padded[i, 0, r : r + 5, c : c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i, 0], w) for w in windows)


def test_flip_flips_about_half():
    x = torch.randn(1000, 1, 4, 4)
    out = data.augment(x, torch.Generator().manual_seed(0), padding=0, flip=True, erasing=0.0)
    flipped = (out == x.flip(-1)).flatten(1).all(1) & ~(out == x).flatten(1).all(1)
    assert 400 < int(flipped.sum()) < 600


def test_erasing_zeroes_one_rectangle_per_chosen_image():
    x = torch.ones(200, 1, 28, 28)
    out = data.augment(x, torch.Generator().manual_seed(0), padding=0, flip=False, erasing=1.0)
    zeroed = (out == 0).flatten(1).sum(1)
    assert (zeroed > 0).all() and (zeroed < 28 * 28 * 0.5).all()


def test_resize_to_224():
    x = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    assert data.normalize(x, 224).shape == (3, 1, 224, 224)
    assert data.normalize(x, None).shape == (3, 1, 28, 28)


def test_a_mirror_file_that_is_not_gzip_is_one_clear_error(tmp_path):
    mirror = _mirror_with(tmp_path, corrupt=False)
    (mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"<html>a proxy's error page</html>")
    with pytest.raises(
        fashion_mnist.DataError, match="t10k-labels-idx1-ubyte.gz is not a readable gzip file"
    ):
        fashion_mnist.prepare(str(tmp_path / "root"), str(mirror))
    assert not (tmp_path / "root" / "FashionMNIST" / "raw").exists()
