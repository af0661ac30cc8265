"""CUDA graphs: the part of torch.cuda that captures and replays use (a test substitutes an emulation that runs
on the CPU), and the evaluation as a graph. The training step's capture is step.py's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RunError, first_line
from .evaluate import Evaluator


class CaptureError(RunError):
    """The capture failed, or the captured step disagrees with the eager one: under `on`, exit 1."""


class CudaGraphs:
    """The part of torch.cuda the captured step uses; a test substitutes an emulation that runs on the CPU."""

    def stream(self):
        return torch.cuda.Stream()

    def on(self, stream):
        return torch.cuda.stream(stream)

    def join(self, stream) -> None:
        """The current stream waits for `stream`, and the host for both."""
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def capture(self, fn, stream):
        """fn's kernels recorded as a graph (not run), on `stream`; `.replay()` runs them."""
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread may query events while this thread captures
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            fn()
        return graph


class GraphedEvaluation:
    """The evaluation of one model as a CUDA graph: one static batch of `eval_batch_size` uint8 images, replayed
    batch after batch. The last, partial batch is padded with the previous batch's rows and masked (a 0/1
    weight per row), so one graph serves every batch and the counts stay exact; the confusion matrix is a
    product of one-hot matrices (no bincount: its output size is read on the host). Its weights are the
    model's own tensors, which training updates in place."""

    def __init__(self, evaluator: Evaluator, model: nn.Module, image_shape, graphs, stream):
        self.ev, self.model, self.graphs, self.stream = evaluator, model, graphs, stream
        b, n, dev = evaluator.batch_size, evaluator.num_classes, evaluator.device
        self.images = torch.zeros(b, *image_shape, dtype=torch.uint8, device=dev)
        self.labels = torch.zeros(b, dtype=torch.long, device=dev)
        self.mask = torch.zeros(b, dtype=torch.float64, device=dev)
        self.out_sums = torch.zeros(1 + n * n, dtype=torch.float64, device=dev)
        self.graph = None

    @torch.no_grad()
    def body(self) -> None:
        b, n, dev = self.ev.batch_size, self.ev.num_classes, self.ev.device
        out = self.ev.predict(self.model, self.images, cache=False)
        loss = (F.cross_entropy(out, self.labels, reduction="none").double() * self.mask).sum()
        true = torch.zeros(b, n, dtype=torch.float64, device=dev).scatter_(1, self.labels[:, None], 1.0)
        pred = torch.zeros(b, n, dtype=torch.float64, device=dev).scatter_(
            1, out.argmax(1, keepdim=True), 1.0
        )
        self.out_sums += torch.cat([loss[None], ((true * self.mask[:, None]).T @ pred).flatten()])

    @classmethod
    def checked(
        cls, evaluator: Evaluator, model: nn.Module, images, labels, graphs, stream
    ) -> GraphedEvaluation:
        """Captured, and checked against the eager evaluation on the first two test batches (CaptureError)."""
        graphed = cls(evaluator, model, images.shape[1:], graphs, stream)
        part = slice(0, min(len(labels), 2 * evaluator.batch_size))
        try:
            graphed.capture(images, labels)
            was_training = model.training
            model.eval()
            eager, replayed = evaluator.sums(model, images, labels, part), graphed.sums(images, labels, part)
            model.train(was_training)
        except Exception as e:  # noqa: BLE001 - one line, as for the step
            raise CaptureError(
                f"capturing the evaluation failed ({type(e).__name__}: {first_line(e)})"
            ) from None
        if not torch.equal(eager[1:], replayed[1:]) or not torch.allclose(eager[0], replayed[0], rtol=1e-3):
            raise CaptureError(
                "the captured evaluation disagrees with the eager one on the first test batches"
            )
        return graphed

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Warm up on the first test batch (cuDNN's search for these shapes), then record the graph."""
        was_training = self.model.training
        self.model.eval()
        k = min(len(labels), self.ev.batch_size)
        self.images[:k].copy_(images[:k])
        self.labels[:k].copy_(labels[:k])
        with self.graphs.on(self.stream):
            for _ in range(2):
                self.body()
        self.graphs.join(self.stream)
        self.graph = self.graphs.capture(self.body, self.stream)
        self.model.train(was_training)

    def sums(self, images: torch.Tensor, labels: torch.Tensor, shard: slice) -> torch.Tensor:
        b = self.ev.batch_size
        self.out_sums.zero_()
        for i in range(shard.start, shard.stop, b):
            k = min(b, shard.stop - i)
            self.images[:k].copy_(images[i : i + k])
            self.labels[:k].copy_(labels[i : i + k])
            self.mask.fill_(1.0)
            if k < b:
                self.mask[k:].zero_()
            self.graph.replay()
        return self.out_sums.clone()
