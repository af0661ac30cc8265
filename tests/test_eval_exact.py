"""Exact evaluation in real gloo process groups: the same numbers for world sizes 1, 2 and 3."""
import multiprocessing as mp
import os

import torch

from resnet_dist import distributed
from resnet_dist.config import ModelConfig
from resnet_dist.data import load_split
from resnet_dist.model import build_model
from resnet_dist.trainer import evaluate_model

from .conftest import free_port

N_TEST = 1001  # divides by neither 2 nor 3: shards have unequal sizes


def _rank(rank, world, port, raw, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    env = distributed.setup(timeout_s=60)
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(stem="imagenet"))
        # a few BatchNorm statistics from training mode, so eval mode is not the identity
        x, y = load_split(raw, "test", N_TEST)
        model.train()
        with torch.no_grad():
            model((x[:256].float() / 255 - 0.286) / 0.353)
        out.put((rank, evaluate_model(model, x, y, env, resize=None, batch_size=100)))
    finally:
        distributed.teardown()


def evaluate_on(world, raw):
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, raw, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def test_evaluation_is_identical_for_1_2_and_3_ranks(data_root):
    raw = data_root / "FashionMNIST" / "raw"
    by_world = {w: evaluate_on(w, raw) for w in (1, 2, 3)}
    ref = by_world[1][0]
    assert ref["test/samples"] == N_TEST
    assert sum(map(sum, ref["confusion"])) == N_TEST
    for w, per_rank in by_world.items():
        for rank, res in per_rank.items():  # every rank holds the global result
            assert res["test/samples"] == N_TEST, (w, rank)
            assert res["test/acc"] == ref["test/acc"], (w, rank)
            assert res["confusion"] == ref["confusion"], (w, rank)
            assert abs(res["test/loss"] - ref["test/loss"]) < 1e-6, (w, rank)
