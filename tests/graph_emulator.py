"""A CUDA graph emulated on the CPU, so that the captured step's logic runs in the tests.

`capture(fn)` runs fn once and records every aten operation it dispatches (forward, backward, the fused optimizer,
the EMA, the sums), with its arguments and results; `replay()` runs the recorded operations again on the same
tensors, writing each result into the tensor the capture produced, as a CUDA graph replays its kernels on the
same memory. So, as on a GPU: Python inside the captured function runs only at capture (a counter it bumps
stays put), a Python number it passed to an operation is frozen, and an input not copied into the tensors the
capture read is not seen. Operations a CUDA graph cannot hold (a host sync such as `.item()`, a data-dependent
shape such as `nonzero`) fail the capture, as they do on a GPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
HOST_SYNC = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.is_nonzero,
    aten.equal,
    aten.masked_select,
    aten.unique_consecutive,
    aten._unique2,
    aten.item,
}


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_SYNC:
            raise RuntimeError(f"operation not permitted when stream is capturing: {func} needs the host")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class EmulatedGraph:
    def __init__(self, ops):
        self.ops = ops
        self.replays = 0

    @torch.no_grad()  # a graph replays kernels: no autograd bookkeeping around them
    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            schema = func._schema
            writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
            views = all(r.alias_info is not None for r in schema.returns) and schema.returns
            if views and not writes:
                continue  # a view of memory the graph already updates
            new = func(*args, **kwargs)
            fresh = [r.alias_info is None for r in schema.returns]
            olds, news = (out, new) if len(schema.returns) > 1 else ((out,), (new,))
            for is_fresh, old, result in zip(fresh, olds, news):
                if not is_fresh:
                    continue
                for o, r in zip(_tensors(old), _tensors(result)):
                    assert o.shape == r.shape, (
                        f"{func}: a replay produced another shape ({r.shape} vs {o.shape})"
                    )
                    o.copy_(r)
        self.replays += 1


class EmulatedGraphs:
    """The interface of resnet_dist.graphs.CudaGraphs, on the CPU (no streams)."""

    def __init__(self):
        self.graphs = []

    def stream(self):
        return None

    def on(self, stream):
        return nullcontext()

    def join(self, stream) -> None:
        pass

    def capture(self, fn, stream):
        recorder = Recorder()
        with recorder:
            fn()
        graph = EmulatedGraph(recorder.ops)
        self.graphs.append(graph)
        return graph
