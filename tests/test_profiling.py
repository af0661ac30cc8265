"""log.profile: torch.profiler traces of a window of steps on every rank, in a real 2-rank gloo group."""

import contextlib
import io
import json

import pytest

from resnet_dist.config import load as load_config
from resnet_dist.profiling import StepProfiler
from resnet_dist.trainer import Trainer

from .helpers import in_gloo_group
from .test_trainer import SYNTH, synthetic


def _profiled_fit(env, run_dir):
    cfg = load_config(None, [f"run.dir={run_dir}", *SYNTH, "train.epochs=1", "log.profile=1:2"], world_size=2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        profiler = StepProfiler(cfg.log.profile, run_dir / "profile", env.rank, env.device, env.is_main)
        Trainer(cfg, env, synthetic(), None, profiler=profiler).fit()
        profiler.close()
    return out.getvalue()


@pytest.mark.processes
def test_two_ranks_write_a_trace_each_with_the_step_and_the_all_reduce(tmp_path):
    printed = in_gloo_group(_profiled_fit, 2, tmp_path)
    for rank in (0, 1):
        trace = json.loads((tmp_path / "profile" / f"rank{rank}.pt.trace.json").read_text())
        names = [e.get("name", "") for e in trace["traceEvents"]]
        assert sum(n.startswith("ProfilerStep#") for n in names) == 2  # the recorded window: 2 steps
        assert any("all_reduce" in n or "allreduce" in n for n in names), sorted(set(names))[:50]
    assert "Self CPU" in printed[0] and "profile: communication ops took" in printed[0]  # rank 0's table
    assert printed[1] == ""  # the other ranks stay quiet
