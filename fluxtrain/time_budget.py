"""Time budgets (train.max_time): the seconds left to train after setup and the final evaluation, and whether the
warm-up can end within them."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from fluxtrain import distributed
from fluxtrain.checkpoint import Checkpoint, Progress
from fluxtrain.data import TokenData
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, eval_mode
from fluxtrain.precision import autocast_context

if TYPE_CHECKING:  # train.py imports this module
    from fluxtrain.optim import OptimConfig
    from fluxtrain.train import TrainConfig

log = logging.getLogger("fluxtrain")

WARMUP_CHECK_STEPS = 10  # steps timed under train.max_time before judging whether the warm-up can finish


@dataclass
class TimeBudget:
    """train.max_time, planned at setup: the seconds the training loop may take, and those kept for the final
    evaluation (which the loop's evaluations may grow, at the loop's expense: `keep_for_final_eval`)."""

    loop_time: float
    final_eval: float

    def keep_for_final_eval(self, eval_time: float) -> float:
        """An evaluation in the loop took `eval_time` seconds: the final one, of as many batches, is kept as long
        (10% to spare) where that is more than kept so far (a machine busier than at setup). Returns the seconds
        this takes from the loop, 0 when none."""
        more = max(0.0, 1.1 * eval_time - self.final_eval)
        self.final_eval += more
        return more


@torch.no_grad()
def forward_seconds(model: nn.Module, data: TokenData, cfg: TrainConfig, device: torch.device) -> float:
    """The median of a few timed forward passes over one batch (the first, a warm-up, not counted): the fastest would
    promise more than a machine shared with other work keeps."""
    x, y = (t.to(device) for t in data.get_batch("val", cfg.batch_size, torch.Generator().manual_seed(0)))
    times = []
    with eval_mode(model), autocast_context(device, cfg.precision):
        for _ in range(6):
            t0 = time.perf_counter()
            model(x, y)[1].item()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def eval_seconds(forward: float, cfg: TrainConfig) -> float:
    """One `estimate_loss` call's wall time with 10% to spare, from one batch's `forward` seconds."""
    return 1.1 * (2 if cfg.eval_train else 1) * cfg.eval_iters * forward


def plan_time_budget(
    tcfg: TrainConfig,
    t_start: float,
    model: GPT,
    data: TokenData,
    device: torch.device,
    progress: Progress,
    resume: Checkpoint | None,
) -> TimeBudget | None:
    """The seconds the training loop may take under train.max_time (None without one): the budget less the setup (the
    seconds since `t_start`, the timing of the final evaluation included) and the final evaluation, timed now. A
    budget that leaves less than about one training step is refused. Under torchrun, rank 0's figures hold for every
    rank."""
    if tcfg.max_time is None:
        return None
    forward = forward_seconds(model, data, tcfg, device)
    final_eval = distributed.main_rank_value(eval_seconds(forward, tcfg), device)
    one_step = distributed.main_rank_value(3 * tcfg.grad_accum * forward, device)  # the backward: about 2 forwards
    setup = distributed.main_rank_value(time.perf_counter() - t_start, device)
    loop_time = tcfg.max_time - setup - final_eval
    if loop_time < one_step:
        left = "no time" if loop_time <= 0 else f"{loop_time:.2f}s, less than one training step (~{one_step:.2f}s),"
        raise FluxtrainError(
            f"train.max_time={tcfg.max_time} leaves {left} to train after setup ({setup:.1f}s) "
            f"and the final evaluation (~{final_eval:.1f}s with train.eval_iters={tcfg.eval_iters})"
        )
    spent = f" (it trained {progress.train_time:.1f}s before the checkpoint)" if resume else ""
    log.info(
        f"time budget {tcfg.max_time:g}s: {setup:.1f}s of setup (data, model, compilation), "
        f"~{final_eval:.1f}s kept for the final evaluation, {loop_time:.1f}s to train{spent}"
    )
    return TimeBudget(loop_time, final_eval)


class WarmupCheck:
    """Under train.max_time: whether the warm-up ends before the time does, judged once from the pace of this
    session's first steps (the very first one, which warms up the kernels, not counted) or when the time runs out.
    When it cannot, a warning says so: the learning rate would never reach optim.lr. An iteration budget too short for
    the warm-up is warned about at setup."""

    def __init__(self, optim: OptimConfig, tcfg: TrainConfig, it: int):
        self.optim, self.tcfg, self.first_it, self.paced_from = optim, tcfg, it, None
        self.done = it >= optim.warmup_iters or optim.warmup_iters >= tcfg.max_iters

    def before_step(self, it: int, elapsed: float, left: float) -> None:
        """Called before each step with the loop's seconds so far and the seconds left to train."""
        if self.done or it == self.first_it:  # a resumed run out of time before its first step was told at setup
            return
        if it == self.first_it + 1:
            self.paced_from = elapsed
        timed = it - self.first_it - 1
        if left <= 0:
            reachable = it
        elif timed >= WARMUP_CHECK_STEPS:
            reachable = it + int(left * timed / max(elapsed - self.paced_from, 1e-9))
        else:
            return
        self.done = True
        warmup = self.optim.warmup_iters
        if reachable < warmup:
            log.warning(
                f"train.max_time={self.tcfg.max_time:g} leaves time for about {reachable:,} iterations, fewer "
                f"than optim.warmup_iters={warmup}: the learning rate stays below optim.lr={self.optim.lr} for "
                "the whole run (lower optim.warmup_iters, or raise train.max_time)"
            )
