"""The captured step and evaluation (train.cuda_graphs), on the CPU through an emulated CUDA graph: replays match
eager training step for step, the pre-training comparison catches a graph that computes something else, what a
graph cannot hold fails the capture, and `on` refuses what cannot be captured."""

import pytest
import torch

from resnet_dist import step
from resnet_dist.config import load as load_config
from resnet_dist.errors import UsageError
from resnet_dist.graphs import CaptureError, GraphedEvaluation
from resnet_dist.trainer import Outcome, Trainer

from .graph_emulator import EmulatedGraphs
from .helpers import exit_code, without_timing
from .test_trainer import CPU_ENV, SYNTH, Recorder, synthetic

CAPTURABLE = (
    *SYNTH,
    "train.ema_decay=0.9",
    "train.label_smoothing=0.1",
    "train.schedule=onecycle",
    "train.warmup=0.25",
)


def trainer(tmp_path, *overrides, graphs=None, log=None):
    cfg = load_config(None, [f"run.dir={tmp_path}", *CAPTURABLE, *overrides], world_size=1)
    return Trainer(cfg, CPU_ENV, synthetic(), tmp_path / "s", log or Recorder(), graphs=graphs)


@pytest.mark.parametrize("extra", [(), ("train.accum_steps=2",)])
def test_captured_training_logs_what_eager_training_logs(tmp_path, extra):
    """Two epochs replayed from one capture (the LR following its schedule through the device tensor, the
    momentum, the EMA, the sums folded in the graph, evaluation replayed batch by batch with a masked last
    batch) log the same numbers as the eager run."""
    eager = trainer(tmp_path / "e", "train.cuda_graphs=off", *extra)
    assert eager.capture() == "eager (train.cuda_graphs=off)"
    graphs = EmulatedGraphs()
    captured = trainer(tmp_path / "c", "train.cuda_graphs=on", *extra, graphs=graphs)
    assert captured.capture() == "captured"
    assert isinstance(captured.step, step.CapturedStep) and captured.graphed_eval is not None
    assert eager.fit() is Outcome.DONE and captured.fit() is Outcome.DONE
    train_graph, eval_graph = graphs.graphs
    # 1 replay in the comparison, then steps 2-8 (step 1's EMA update copies: eager); 40 test images in batches
    # of 16: 3 replays per evaluation, 2 in the comparison
    assert train_graph.replays == 1 + 7 and eval_graph.replays == 2 + 2 * 3
    a, b = without_timing(eager.logger.records), without_timing(captured.logger.records)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            assert v == (pytest.approx(rb[k], rel=1e-5, abs=1e-7) if isinstance(v, float) else rb[k]), (ra, k)
    for ta, tb in zip(eager.model.state_dict().values(), captured.model.state_dict().values()):
        assert torch.allclose(ta.double(), tb.double(), rtol=1e-4, atol=1e-6)


def test_the_comparison_catches_a_graph_that_reads_a_stale_batch(tmp_path, monkeypatch, capsys):
    """A replay that does not see the new batch (here: the copy into the static input is lost) differs from
    the eager step on the same batch: `auto` falls back to eager with one warning, `on` stops."""
    replay = step.CapturedStep.__call__

    def stale(self, x, y, n):
        return replay(self, torch.zeros_like(x), y, n)

    monkeypatch.setattr(step.CapturedStep, "__call__", stale)
    auto = trainer(tmp_path / "a", "train.cuda_graphs=auto", graphs=EmulatedGraphs())
    before = {k: v.clone() for k, v in auto.model.state_dict().items()}
    how = auto.capture()
    assert how.startswith("eager (the capture failed: the captured step disagrees with the eager one")
    assert isinstance(auto.step, step.EagerStep)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "warning: the step runs eagerly: the captured step disagrees"
    )
    after = auto.model.state_dict()  # the warm-up, the capture and the comparison left no trace
    assert all(torch.equal(before[k], after[k]) for k in before) and auto.meter.steps == 0
    assert auto.ema.count == 0 and all(
        torch.equal(before[k], v) for k, v in auto.ema.module.state_dict().items()
    )
    on = trainer(tmp_path / "o", "train.cuda_graphs=on", graphs=EmulatedGraphs())
    with pytest.raises(CaptureError, match="disagrees with the eager one on the same batch: loss"):
        on.capture()


def test_a_host_sync_inside_the_step_fails_the_capture(tmp_path):
    """foreach SGD reads a tensor LR on the host (.item()): a graph cannot hold that; the fused one reads it on
    the device. The failed capture leaves the state as it was and the run goes on eagerly."""
    t = trainer(tmp_path, "train.cuda_graphs=auto", graphs=EmulatedGraphs())
    for group in t.optimizer.param_groups:
        group.update(fused=None, foreach=True)
    assert t.capture().startswith("eager (the capture failed: capturing the step failed (RuntimeError: ")
    assert t.fit() is Outcome.DONE


def test_the_evaluation_graph_counts_every_image_once(tmp_path):
    """40 test images in batches of 16: the last batch of 8 is padded and masked, the counts exact."""
    t = trainer(tmp_path, "train.cuda_graphs=off")
    graphed = GraphedEvaluation(t.evaluator, t.model, (1, 28, 28), EmulatedGraphs(), None)
    x, y = t.data.test_x, t.data.test_y
    graphed.capture(x, y)
    for shard in (slice(0, 40), slice(3, 29)):
        t.model.eval()
        eager, replayed = t.evaluator.sums(t.model, x, y, shard), graphed.sums(x, y, shard)
        assert torch.equal(eager[1:], replayed[1:]) and replayed[1:].sum() == shard.stop - shard.start
        assert torch.allclose(eager[0], replayed[0], rtol=1e-6)


@pytest.mark.parametrize(
    "setting, gpu, precision, world, backend, extra, why",
    [
        ("auto", True, "bf16", 1, None, (), None),
        ("auto", True, "fp32", 1, None, ("train.accum_steps=2",), None),
        ("on", True, "bf16", 2, "nccl", (), None),
        ("off", True, "bf16", 1, None, (), "train.cuda_graphs=off"),
        ("auto", False, "fp32", 1, None, (), "not on a GPU"),
        ("auto", True, "fp16", 1, None, (), "fp16"),
        ("auto", True, "bf16", 2, "nccl", (), "not yet verified on 2+ GPUs"),
        ("auto", True, "bf16", 2, "gloo", (), "gloo collectives pass through the host"),
    ],
)
def test_when_the_step_is_captured(setting, gpu, precision, world, backend, extra, why):
    cfg = load_config(None, list(extra))
    got = step.plan(setting, gpu, precision, world, backend, cfg)
    assert (got is None) if why is None else (why in got)


@pytest.mark.parametrize(
    "gpu, precision, world, backend, extra",
    [
        (False, "fp32", 1, None, ()),
        (True, "fp16", 1, None, ()),
        (True, "bf16", 2, "gloo", ()),
        (True, "bf16", 2, "nccl", ("dist.grad_compression=bf16",)),
    ],
)
def test_on_refuses_what_cannot_be_captured(gpu, precision, world, backend, extra):
    with pytest.raises(UsageError, match="train.cuda_graphs=on cannot capture this run"):
        step.plan("on", gpu, precision, world, backend, load_config(None, list(extra)))


def test_cuda_graphs_on_a_cpu_is_a_usage_error(tmp_path, capsys):
    from resnet_dist import train

    code = exit_code(train.main, [f"run.dir={tmp_path}", "train.cuda_graphs=on"])
    assert code == 2
    err = capsys.readouterr().err
    assert err == "error: train.cuda_graphs=on cannot capture this run (not on a GPU): use auto or off\n"
    assert not any(tmp_path.iterdir())
