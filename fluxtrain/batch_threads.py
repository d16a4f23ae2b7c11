"""Data parallelism over CPU threads: each part of a micro-batch runs its forward and backward on a thread of its own.

A small model's matrix products are too small for torch's intra-op threads to share well: two threads splitting
every product and every elementwise kernel wait on each other hundreds of times per step. With `train.batch_threads`
the micro-batch is split into equal parts instead, and each part runs forward and backward on its own thread with
single-threaded kernels, as data-parallel ranks would, but in one process: the parameters are shared, and the parts'
gradients are summed in a fixed order, so a run gives the same numbers every time and resumes exactly. Everything else
(clipping, the optimizer step, evaluation, sampling) runs on the main thread with `train.threads`.

Compiled kernels keep the thread count they were compiled with, so the training graph is compiled inside
`single_threaded()`, on one part (see `fluxtrain.train.wrap_for_training`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from fluxtrain.errors import FluxtrainError


def check(n: int, device: torch.device, distributed: bool, dropout: float) -> None:
    """`train.batch_threads=n` splits batches over CPU threads of one process, reproducibly: a one-line error where it
    cannot (its range and train.batch_size's split are checked with the other train settings)."""
    if n == 1:
        return
    if device.type != "cpu":
        raise FluxtrainError(f"train.batch_threads={n} splits batches over CPU threads; this run trains on {device}")
    if distributed:
        raise FluxtrainError(
            f"train.batch_threads={n} splits batches over the threads of one process; under torchrun set it to 1"
        )
    if dropout > 0:
        raise FluxtrainError(
            f"train.batch_threads={n} needs model.dropout=0: dropout masks drawn by several threads at once would "
            "differ from run to run (train.batch_threads=1 trains with dropout)"
        )


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch ops of the calling thread run on one thread inside the block; the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchThreads:
    """`n - 1` worker threads besides the caller's; `map` runs one function call per part, part 0 on the caller."""

    def __init__(self, n: int):
        self.n = n
        # torch sets up a thread's count at its first parallel op, from the count last set by any thread: the caller's
        # comes first, or it would take the workers' one thread (for evaluation and the optimizer step too).
        torch.get_num_threads()
        self._jobs: list[queue.SimpleQueue] = []
        self._results: list[queue.SimpleQueue] = []
        self._threads: list[threading.Thread] = []
        for i in range(1, n):
            jobs, results = queue.SimpleQueue(), queue.SimpleQueue()
            thread = threading.Thread(target=self._work, args=(jobs, results), name=f"batch-thread-{i}", daemon=True)
            thread.start()
            self._jobs.append(jobs)
            self._results.append(results)
            self._threads.append(thread)

    @staticmethod
    def _work(jobs: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
        torch.set_num_threads(1)
        while (job := jobs.get()) is not None:
            fn, arg = job
            try:
                results.put((True, fn(arg)))
            except BaseException as e:  # handed to the caller, which raises it
                results.put((False, e))

    def map(self, fn: Callable, args: Sequence) -> list:
        """`[fn(a) for a in args]` with `len(args) == n`, the calls running at once, each on one torch thread."""
        for jobs, arg in zip(self._jobs, args[1:], strict=True):
            jobs.put((fn, arg))
        with single_threaded():
            try:
                first = fn(args[0])
            finally:
                outcomes = [results.get() for results in self._results]  # every worker is idle again
        for ok, value in outcomes:
            if not ok:
                raise value
        return [first, *(value for _, value in outcomes)]

    def forward_backward(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        x,
        y,
        scale: float,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        """Forward and backward of `model` on (x, y) split into `n` equal parts; adds `scale` times the gradient of
        the mean loss to `params`' .grad and returns that mean loss (detached). Each part's forward runs inside
        `autocast()`, entered on the part's own thread: autocast holds for the thread that enters it."""
        if len(x) % self.n:
            raise FluxtrainError(f"a batch of {len(x)} sequences does not split into train.batch_threads={self.n}")
        parts = list(zip(x.chunk(self.n), y.chunk(self.n), strict=True))

        def part(xy):
            with autocast():
                _, loss = model(*xy)
            grads = torch.autograd.grad(loss * (scale / self.n), params, allow_unused=True)
            return loss.detach(), grads

        results = self.map(part, parts)
        used = [i for i, g in enumerate(results[0][1]) if g is not None]
        with torch.no_grad():
            total = [results[0][1][i] for i in used]
            for _, grads in results[1:]:  # in part order: the same sums every run
                torch._foreach_add_(total, [grads[i] for i in used])
            into, added = [], []  # gradients held from earlier micro-batches, and what they gain
            for i, g in zip(used, total, strict=True):
                if params[i].grad is None:
                    params[i].grad = g
                else:
                    into.append(params[i].grad)
                    added.append(g)
            if into:
                torch._foreach_add_(into, added)
        losses = [loss for loss, _ in results]
        return sum(losses[1:], losses[0]) / self.n

    def close(self) -> None:
        for jobs in self._jobs:
            jobs.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> BatchThreads:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
