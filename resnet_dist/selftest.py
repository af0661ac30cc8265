"""`python -m resnet_dist.selftest` (alone or under a launcher): a real all-reduce on this launch's backend
(NCCL on GPUs, gloo on CPU), checked and timed. launch/gpu_check.sh runs it first."""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from . import cli, distributed, launchcheck
from .errors import RunError, UsageError


def self_test(env: distributed.DistEnv, size_mb: int = 64, iters: int = 5) -> dict:
    """All-reduce each rank's number over `size_mb` MB: the sum must be right; the time gives the bus bandwidth
    (what each link carried in a ring all-reduce, as nccl-tests defines it)."""
    if not dist.is_initialized():  # one process: a group of one still exercises the backend
        dist.init_process_group(
            "nccl" if env.device.type == "cuda" else "gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            device_id=env.device if env.device.type == "cuda" else None,
        )
    n = size_mb * 2**20 // 4
    t = torch.full((n,), float(env.rank + 1), device=env.device)
    dist.all_reduce(t)
    ok = bool(torch.all(t == env.world_size * (env.world_size + 1) / 2))
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    sync()
    secs, w = (time.perf_counter() - start) / iters, env.world_size
    return {
        "backend": dist.get_backend(),
        "world_size": w,
        "device": str(env.device),
        "correct": ok,
        "size_mb": size_mb,
        "ms": 1e3 * secs,
        "bus_gb_s": size_mb * 2**20 * 2 * (w - 1) / w / secs / 1e9,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m resnet_dist.selftest", description=__doc__)
    p.add_argument("--size-mb", type=int, default=64, help="all-reduced megabytes (default 64)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    env = None
    try:
        env = launchcheck.start()
        cli.setup_logging(env.is_main)
        r = self_test(env, args.size_mb)
        if env.is_main:
            print(
                f"all_reduce self-test: backend={r['backend']} world_size={r['world_size']} device={env.device} "
                f"{'correct' if r['correct'] else 'WRONG RESULT'}, {r['size_mb']} MB in {r['ms']:.2f} ms "
                f"(bus bandwidth {r['bus_gb_s']:.1f} GB/s)",
                flush=True,
            )
        if not r["correct"]:
            raise RunError("the all-reduce summed wrongly: the backend or the interconnect is broken")
        return 0
    except (UsageError, RunError) as e:
        return cli.report(e, env)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
