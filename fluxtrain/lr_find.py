"""The learning-rate range test: raise the LR exponentially on a fresh model and suggest one from the loss curve."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fluxtrain import distributed, host
from fluxtrain.data import load_corpus
from fluxtrain.distributed import World
from fluxtrain.errors import FluxtrainError
from fluxtrain.files import atomic_write, atomic_write_text
from fluxtrain.init_from import load_start_weights
from fluxtrain.logs import event_writer
from fluxtrain.optim import build_optimizer, set_lr
from fluxtrain.precision import grad_scaler, warn_without_autocast
from fluxtrain.resume import list_checkpoints
from fluxtrain.runs import RUN_OUTPUTS
from fluxtrain.train import build_model, check_settings, train_step

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("fluxtrain")

RULES = {
    "steepest": "steepest descent of the smoothed loss",
    "min_div_10": "a tenth of the LR at the smoothed loss's minimum",
}
JSON_FILE, PNG_FILE = "lr_find.json", "lr_find.png"
OUTPUTS = (JSON_FILE, PNG_FILE, "events.out.tfevents.*")  # what a test writes into its folder
MIN_DROP = 0.05  # the smoothed loss must fall by this fraction of its start before a minimum counts as a descent


@dataclass
class LRFindConfig:
    start_lr: float = 1e-7
    end_lr: float = 1.0
    num_steps: int = 300
    smoothing: float = 0.9  # EMA factor of the smoothed loss (0 = no smoothing)
    stop_factor: float = 4.0  # stop once the smoothed loss exceeds this multiple of its best
    rule: str = "steepest"  # steepest | min_div_10


@dataclass
class LRFindResult:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested_lr: float | None  # None: the smoothed loss did not fall by MIN_DROP, so there is no descent to pick
    rule: str
    stopped_early: bool
    # With optim.name=muon: Muon's lr, which rose with optim.lr at the configured ratio optim.muon_lr / optim.lr.
    suggested_muon_lr: float | None = None

    def summary(self) -> str:
        if self.suggested_lr is None:
            return f"no suggestion: the smoothed loss fell by less than {MIN_DROP:.0%} (lr_find.rule={self.rule})"
        muon = "" if self.suggested_muon_lr is None else f" optim.muon_lr={self.suggested_muon_lr:.2e}"
        return f"suggested optim.lr={self.suggested_lr:.2e}{muon} (rule: {RULES[self.rule]}; lr_find.rule={self.rule})"


def validate(cfg: LRFindConfig) -> None:
    if not 0 < cfg.start_lr < cfg.end_lr:
        raise FluxtrainError(f"lr_find.start_lr={cfg.start_lr} must be positive and below lr_find.end_lr={cfg.end_lr}")
    if cfg.num_steps < 10:
        raise FluxtrainError(f"lr_find.num_steps={cfg.num_steps} must be at least 10")
    if not 0.0 <= cfg.smoothing < 1.0:
        raise FluxtrainError(f"lr_find.smoothing={cfg.smoothing} must be in [0, 1)")
    if cfg.stop_factor <= 1.0:
        raise FluxtrainError(f"lr_find.stop_factor={cfg.stop_factor} must be greater than 1")
    if cfg.rule not in RULES:
        raise FluxtrainError(f"lr_find.rule={cfg.rule!r} is not one of {', '.join(RULES)}")


def lr_schedule(cfg: LRFindConfig) -> np.ndarray:
    """`num_steps` learning rates spaced evenly in log scale from start_lr to end_lr."""
    return np.geomspace(cfg.start_lr, cfg.end_lr, cfg.num_steps)


class MovingAverage:
    """Exponential moving average with bias correction, so the first values are not pulled towards zero."""

    def __init__(self, beta: float):
        self.beta, self.average, self.count = beta, 0.0, 0

    def add(self, value: float) -> float:
        """The average after `value`."""
        self.average = self.beta * self.average + (1 - self.beta) * value
        self.count += 1
        return self.average / (1 - self.beta**self.count)


def ema(values: np.ndarray, beta: float) -> np.ndarray:
    """`MovingAverage` after each of `values`."""
    average = MovingAverage(beta)
    return np.array([average.add(v) for v in values], dtype=float)


def zero_lag_smooth(values: np.ndarray, beta: float) -> np.ndarray:
    """The EMA run forwards then backwards: as smooth as the EMA, without shifting the curve to later steps."""
    return ema(ema(values, beta)[::-1], beta)[::-1]


def relative_drop(smoothed: np.ndarray) -> float:
    """How far the smoothed loss fell from its start to its minimum, as a fraction of the start."""
    return float((smoothed[0] - smoothed.min()) / smoothed[0])


def suggest_lr(lrs: np.ndarray, smoothed: np.ndarray, rule: str) -> float | None:
    """The LR suggested by `rule` from the smoothed loss curve; only the part up to its minimum is considered.
    None when the smoothed loss did not fall by MIN_DROP of its start before its minimum, or is lowest at the first
    steps: its minimum is noise, not the bottom of a descent."""
    i_min = int(np.argmin(smoothed))
    if i_min < 2 or relative_drop(smoothed) < MIN_DROP:
        return None
    if rule == "min_div_10":
        return float(lrs[i_min] / 10)
    slopes = np.gradient(smoothed[: i_min + 1], np.log10(lrs[: i_min + 1]))  # loss change per decade of LR
    return float(lrs[int(np.argmin(slopes))])


def plot(result: LRFindResult) -> Figure:
    from matplotlib.figure import Figure  # half a second of every command's start, for task=lr_find alone

    fig = Figure(figsize=(7, 4.5), dpi=100)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed loss")
    if result.suggested_lr is not None:
        ax.axvline(result.suggested_lr, color="C3", linestyle="--", label=f"suggested lr {result.suggested_lr:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (nats/token)")
    top = min(max(result.losses), 2 * result.smoothed[0])  # keep the initial loss in view, clip the explosion
    ax.set_ylim(min(result.smoothed) * 0.9, top * 1.05)
    ax.set_title(f"LR range test: {RULES[result.rule]}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def lr_find(cfg: DictConfig, run_dir: str | Path) -> LRFindResult:
    """Train a fresh model for up to `lr_find.num_steps` steps at exponentially rising LRs and suggest one.

    Writes lr_find.png (loss vs LR), lr_find.json (the curve and suggestion) and TensorBoard events into `run_dir`.
    """
    fcfg = LRFindConfig(**OmegaConf.to_container(cfg.lr_find, resolve=True))
    validate(fcfg)
    tcfg = cfg.train
    model_cfg = check_settings(cfg)
    if distributed.current_world().is_distributed:
        raise FluxtrainError("task=lr_find runs in one process: start it with python, not torchrun")
    device = host.resolve_device(tcfg.device)
    run_dir = Path(run_dir)
    if list_checkpoints(run_dir) or any(next(run_dir.glob(pattern), None) for pattern in RUN_OUTPUTS):
        raise FluxtrainError(
            f"{run_dir} holds a training run, and task=lr_find writes its config, curve and events into its folder: "
            "give it a folder of its own (hydra.run.dir)"
        )
    if any(next(run_dir.glob(pattern), None) for pattern in OUTPUTS):  # TensorBoard would show both tests as one
        raise FluxtrainError(
            f"{run_dir} holds an earlier lr_find's curve and events: give this one a folder of its own "
            "(hydra.run.dir), or remove lr_find.json, lr_find.png and the events.out.tfevents.* files there"
        )
    if tcfg.batch_threads > 1:
        log.info(f"lr_find: train.batch_threads={tcfg.batch_threads} is for training; the test runs on torch's threads")
    if tcfg.compile:
        log.info("lr_find: train.compile=true is for training; the test runs eagerly")
    if tcfg.max_time is not None:
        log.info(f"lr_find: train.max_time={tcfg.max_time:g} is for training; the test runs lr_find.num_steps steps")
    warn_without_autocast(device, tcfg.precision, "the test runs")
    run_dir.mkdir(parents=True, exist_ok=True)

    host.configure(tcfg.threads, tcfg.keep_cpu_memory)
    torch.manual_seed(tcfg.seed)
    start = load_start_weights(cfg, model_cfg, resuming=False)  # a learning rate to fine-tune that model with
    given = start.tokenizer if start else None
    data, tokenizer, source = load_corpus(cfg.data, cfg.tokenizer, model_cfg.seq_len, run_dir, given)
    model = build_model(model_cfg, tokenizer.vocab_size, device, start)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = grad_scaler(device, tcfg.precision)
    batch_gen = torch.Generator().manual_seed(tcfg.seed)
    log.info(
        f"lr_find: {fcfg.num_steps} steps from lr {fcfg.start_lr:.0e} to {fcfg.end_lr:.0e} | "
        f"{model.num_params():,} parameters | data {source}"
    )
    # Muon's lr follows optim.lr scaled by its group's lr_scale (optim.muon_lr / optim.lr), as set_lr applies it
    muon_ratio = next((group["lr_scale"] for group in optimizer.param_groups if "lr_scale" in group), None)
    if muon_ratio is not None:
        log.info(
            f"lr_find: Muon's lr rises with the tested lr at optim.muon_lr / optim.lr = {muon_ratio:.3g}; the "
            "suggestion names both"
        )

    with event_writer(run_dir) as writer:  # a full disk under it: one line naming the event file
        lrs, losses, best = [], [], math.inf
        average, stopped_early = MovingAverage(fcfg.smoothing), False
        for step, lr in enumerate(lr_schedule(fcfg)):
            set_lr(optimizer, float(lr))
            world, clip = World(), cfg.optim.grad_clip
            loss = train_step(model, optimizer, scaler, data, batch_gen, world, device, tcfg, clip)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                stopped_early = True
                log.info(f"lr_find: loss became {loss_value} at lr {lr:.2e}; stopping")
                break
            lrs.append(float(lr))
            losses.append(loss_value)
            smoothed = average.add(loss_value)
            best = min(best, smoothed)
            writer.add_scalar("lr_find/lr", lr, step)
            writer.add_scalar("lr_find/loss", loss_value, step)
            if (step + 1) % max(fcfg.num_steps // 10, 1) == 0:
                log.info(f"lr_find: step {step + 1:>4}/{fcfg.num_steps} | lr {lr:.2e} | loss {loss_value:.4f}")
            if smoothed > fcfg.stop_factor * best:
                stopped_early = True
                stop = f"smoothed loss {smoothed:.3f} > {fcfg.stop_factor} x best {best:.3f}"
                log.info(f"lr_find: {stop}; stopping")
                break
        if len(losses) < 3:
            raise FluxtrainError(f"lr_find: the loss diverged after {len(losses)} steps; lower lr_find.start_lr")

        lr_arr, smoothed_arr = np.array(lrs), zero_lag_smooth(np.array(losses), fcfg.smoothing)
        suggested = suggest_lr(lr_arr, smoothed_arr, fcfg.rule)
        result = LRFindResult(
            lrs=lrs,
            losses=losses,
            smoothed=smoothed_arr.tolist(),
            suggested_lr=suggested,
            rule=fcfg.rule,
            stopped_early=stopped_early,
            suggested_muon_lr=None if suggested is None or muon_ratio is None else suggested * muon_ratio,
        )
        # the curve the suggestion is read from, as in the PNG and JSON
        for step, value in enumerate(result.smoothed):
            writer.add_scalar("lr_find/smoothed_loss", value, step)
        fig = plot(result)
        atomic_write(run_dir / PNG_FILE, lambda tmp: fig.savefig(tmp, format="png"))
        atomic_write_text(run_dir / JSON_FILE, json.dumps(asdict(result), indent=1) + "\n")
        writer.add_figure("lr_find/curve", fig, close=False)
        writer.add_text("lr_find/suggestion", result.summary())
        writer.close()
    if result.suggested_lr is None:
        i_min, png = int(np.argmin(smoothed_arr)), run_dir / PNG_FILE
        raise FluxtrainError(
            f"lr_find: no suggestion, the smoothed loss fell by only {relative_drop(smoothed_arr):.1%} (needs "
            f"{MIN_DROP:.0%}) to its minimum at step {i_min + 1}/{len(lrs)}, lr {lrs[i_min]:.2e} (curve in {png}); "
            f"a short run's final rise smooths back over the whole curve: raise lr_find.num_steps={fcfg.num_steps} "
            f"or lower lr_find.smoothing={fcfg.smoothing}, or narrow lr_find.start_lr={fcfg.start_lr:g} to "
            f"lr_find.end_lr={fcfg.end_lr:g} so more steps fall where the loss moves; if the raw loss rose from the "
            f"start, lower lr_find.start_lr"
        )
    log.info(f"lr_find: {result.summary()} | curve in {run_dir / PNG_FILE}")
    return result
