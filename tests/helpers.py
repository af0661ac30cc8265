"""Test helpers: real launchers run as subprocesses, real gloo groups in spawned processes, short runs on real data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra) -> dict:
    """The environment of a launched job: no inherited launcher variables, W&B off unless asked, 1 thread, this
    interpreter."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "ACCELERATE_", "WANDB_"))
        and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    }
    # PYTHON: the launch scripts run this interpreter (not whatever .venv or python3 the checkout has)
    env.update({"WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHON": PY})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun(nproc: int, *extra_launcher_args: str, module: str = "resnet_dist.train") -> list[str]:
    return [
        PY,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0",
        *extra_launcher_args,
        "-m",
        module,
    ]


# 512 images, global batch 64 on 2 ranks: 8 steps per epoch, 24 in all; logs every 3 steps and
# checkpoints every 2, so a checkpoint can fall inside a log interval (its partial sums must carry over)
RESUME = (
    "train.epochs=3",
    "checkpoint.every_steps=2",
    "checkpoint.keep=3",
    "train.momentum=0.9",
    "train.schedule=onecycle",
    "train.warmup=0.2",
    "data.crop_padding=2",
    "data.flip=true",
    "data.erasing=0.3",
)


def small_run(data_root: Path, run_dir: Path, name: str, *overrides: str) -> list[str]:
    """Overrides for a short run on a subset of the real data."""
    return [
        f"data.root={data_root}",
        f"run.dir={run_dir}",
        f"run.name={name}",
        "data.train_subset=512",
        "data.test_subset=999",
        "train.batch_size=64",
        "train.epochs=2",
        "log.every_steps=3",
        "data.eval_batch_size=256",
        *overrides,
    ]


HELD = [PY, "-m", "tests.held"]  # `python -m resnet_dist.train` held at a known point (tests/held.py)


def hold(folder: Path, *points: str, rank: int | None = 0, only_if: str = "", site: bool = False) -> dict:
    """The environment of a run started as HELD (or torchrun(module="tests.held")) that holds at each of
    `points` ("step 3 until signal", "stop"), on rank `rank` (None: every rank), in a process whose environment
    has `only_if` (NAME=VALUE); `marker(folder, point)` appears once it does. site: for runs that a launch
    script or SLURM starts as `-m resnet_dist.train` (tests/hold_site on PYTHONPATH). See tests/held.py."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {"HOLD_DIR": folder, "HOLD": ", ".join(points), "HOLD_RANK": "" if rank is None else rank}
    if only_if:
        env["HOLD_IF"] = only_if
    if site:
        env["PYTHONPATH"] = REPO / "tests" / "hold_site"
    return env


def launch(cmd: list[str], **env) -> subprocess.Popen:
    """A process the test talks to (signals, kills) while it runs: text pipes for its stdout and stderr."""
    return subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(path: Path, *procs: subprocess.Popen, timeout: float = 180) -> None:
    """Until `path` exists (a held run's marker, a checkpoint), while every one of `procs` is still running."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        for proc in procs:
            assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def run(cmd: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return proc


def read_metrics(run_path: Path) -> list[dict]:
    return [
        json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]


TIMING = ("images_per_s", "mfu", "time/")


def without_timing(records: list[dict]) -> list[dict]:
    """Every logged value but the wall-clock ones (speed, MFU, the ranks' forward times)."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def epochs(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "epoch"]


def _spawned(fn, rank, world, port, out, args):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    from resnet_dist import distributed, launchcheck

    torch.set_num_threads(1)
    env = launchcheck.start(timeout_s=60)
    try:
        out.put((rank, fn(env, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the test, not lost in a child
        out.put((rank, e))
        raise
    finally:
        distributed.teardown()


def in_gloo_group(fn, world: int, *args, timeout: float = 240) -> list:
    """fn(env, *args) on `world` spawned processes in a real gloo group; the results by rank.

    `fn` must be importable (a module-level function of a test module)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_spawned, args=(fn, r, world, port, out, args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for r in range(world):
        if isinstance(results[r], BaseException):
            raise AssertionError(f"rank {r} failed: {results[r]!r}")
    return [results[r] for r in range(world)]


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs mounted at `path` (size=..., ro): a full or read-only disk; skips without root."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def call(main, *argv: str, **env) -> tuple[int, str, str]:
    """`main(argv)` of an entry point in this process, as a launched job would run it: os.environ as
    clean_env(**env) makes it; the environment, the signal handlers and torch's determinism switches put back
    afterwards. (exit code, stdout, stderr)."""
    import torch

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    environ = dict(os.environ)
    switches = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    fresh = clean_env(**env)
    os.environ.clear()
    os.environ.update(fresh)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = exit_code(main, list(argv))
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.use_deterministic_algorithms(switches[0], warn_only=switches[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = switches[2:]
    return code, out.getvalue(), err.getvalue()


def exit_code(main, *args) -> int:
    """An entry point's exit code in-process: what `main(*args)` returns, or the code of the SystemExit it
    raises (argparse's usage errors, --help)."""
    try:
        return main(*args)
    except SystemExit as e:
        return e.code
