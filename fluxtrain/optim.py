"""Optimizer construction and the learning-rate schedule: linear warm-up, then cosine, linear or warmup-stable-decay."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fluxtrain.errors import FluxtrainError


@dataclass
class OptimConfig:
    name: str = "adam"  # adam (torch.optim.Adam) | adamw | muon (Muon for hidden matrices, AdamW for the rest)
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_iters: int = 100
    min_lr: float = 0.0
    # After the warm-up: cosine from lr to min_lr | linear: a straight line to min_lr | wsd (warmup-stable-decay):
    # lr held, then a straight line to min_lr over the last decay_frac of the budget after the warm-up.
    schedule: str = "cosine"
    decay_frac: float = 0.2
    # muon only: the hidden 2-D weights follow the same schedule, scaled to start at muon_lr.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95


def _is_number(value: object) -> bool:
    """A real number (not a bool, not a text)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _shown(value: object) -> object:
    """A number as itself, anything else quoted: optim.lr='x' is a text, not a number."""
    return value if _is_number(value) else repr(value)


def validate(cfg: OptimConfig) -> None:
    for name in ("lr", "min_lr", "weight_decay", "grad_clip", "muon_lr", "muon_momentum", "decay_frac"):
        value = getattr(cfg, name)
        if not (_is_number(value) and math.isfinite(value)):
            raise FluxtrainError(f"optim.{name}={_shown(value)} must be a finite number")
    if not (_is_number(cfg.warmup_iters) and isinstance(cfg.warmup_iters, numbers.Integral) and cfg.warmup_iters >= 0):
        raise FluxtrainError(f"optim.warmup_iters={_shown(cfg.warmup_iters)} must be an integer >= 0")
    if not (isinstance(cfg.name, str) and cfg.name in OPTIMIZERS):
        raise FluxtrainError(f"optim.name={cfg.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if cfg.name == "muon" and not hasattr(torch.optim, "Muon"):
        raise FluxtrainError(
            f"optim.name=muon needs torch.optim.Muon (torch 2.9 or newer); this is torch {torch.__version__}"
        )
    if cfg.muon_lr <= 0:  # checked with any optimizer: a sweep over optim.name uses them for one of its jobs
        raise FluxtrainError(f"optim.muon_lr={cfg.muon_lr} must be positive")
    if not 0.0 <= cfg.muon_momentum < 1.0:
        raise FluxtrainError(f"optim.muon_momentum={cfg.muon_momentum} must be in [0, 1)")
    if cfg.lr <= 0:
        raise FluxtrainError(f"optim.lr={cfg.lr} must be positive")
    betas = list(cfg.betas) if isinstance(cfg.betas, Sequence) and not isinstance(cfg.betas, str) else cfg.betas
    if not (isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise FluxtrainError(f"optim.betas={betas!r} must be two numbers in [0, 1)")
    if cfg.weight_decay < 0:
        raise FluxtrainError(f"optim.weight_decay={cfg.weight_decay} must be >= 0")
    if cfg.grad_clip < 0:
        raise FluxtrainError(f"optim.grad_clip={cfg.grad_clip} must be >= 0 (0 turns clipping off)")
    if not 0.0 <= cfg.min_lr <= cfg.lr:
        raise FluxtrainError(f"optim.min_lr={cfg.min_lr} must be between 0 and optim.lr={cfg.lr}")
    if not (isinstance(cfg.schedule, str) and cfg.schedule in SCHEDULES):
        raise FluxtrainError(f"optim.schedule={cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if not 0.0 < cfg.decay_frac <= 1.0:
        raise FluxtrainError(f"optim.decay_frac={cfg.decay_frac} must be in (0, 1]")


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on the 2-D parameters (the linear layers' weights and the embeddings); biases and norm weights
    are not decayed."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adam(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(trainable(model), cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=_betas(cfg), fused=_fused(model))


def adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(trainable(model), cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=_betas(cfg), fused=_fused(model))


def _fused(model: nn.Module) -> bool | None:
    """The fused (one kernel per tensor) Adam where torch has it: 3x faster than foreach on CPU for small models."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()) or None


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer blocks: what Muon orthogonalizes (not embeddings, head or norms)."""
    return [p for name, p in model.named_parameters() if p.requires_grad and p.dim() == 2 and ".blocks." in f".{name}"]


def muon(model: nn.Module, cfg: OptimConfig) -> MultiOptimizer:
    """torch.optim.Muon for the hidden matrices, AdamW for embeddings, head, norms and biases."""
    matrices = hidden_matrices(model)
    chosen = {id(p) for p in matrices}
    adamw_groups = param_groups([p for p in trainable(model) if id(p) not in chosen], cfg.weight_decay)
    # lr_scale: set_lr multiplies the scheduled optim.lr by it, so both optimizers follow one schedule.
    muon_opt = torch.optim.Muon(
        [{"params": matrices, "lr_scale": cfg.muon_lr / cfg.lr}],
        lr=cfg.muon_lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
    )
    adamw_opt = torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=_betas(cfg), fused=_fused(model))
    return MultiOptimizer([adamw_opt, muon_opt])


class MultiOptimizer:
    """Several optimizers over disjoint parameters, stepped together; the loop sees one optimizer."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self, closure=None) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """One torch-shaped state dict: the optimizers' parameter indices numbered on, one after the other."""
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}")
        first, offset = 0, 0
        for opt in self.optimizers:
            mine = groups[first : first + len(opt.param_groups)]
            first += len(mine)
            ids = [i for g in mine for i in g["params"]]
            opt.load_state_dict(
                {
                    "state": {i - offset: state[i] for i in ids if i in state},
                    "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
                }
            )
            offset += len(ids)


OPTIMIZERS = {"adam": adam, "adamw": adamw, "muon": muon}
# After the warm-up, the fraction of (lr - min_lr) left at `progress` through the rest of the budget.
SCHEDULES: dict[str, Callable[[float, OptimConfig], float]] = {
    "cosine": lambda progress, cfg: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress, cfg: 1.0 - progress,
    "wsd": lambda progress, cfg: min(1.0, (1.0 - progress) / cfg.decay_frac),  # held, then straight down
}


def _betas(cfg: OptimConfig) -> tuple[float, float]:
    return float(cfg.betas[0]), float(cfg.betas[1])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | MultiOptimizer:
    validate(cfg)
    return OPTIMIZERS[cfg.name](model, cfg)


def lr_at(it: int, progress: float, cfg: OptimConfig) -> float:
    """Learning rate at iteration `it`: linear warm-up over `warmup_iters`, then `cfg.schedule` from lr to min_lr.

    `progress` in [0, 1] is how far the run is through its budget (iterations, or seconds with a time budget);
    the decay covers the part of the budget after the warm-up.
    """
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)  # the first step already learns
    left = SCHEDULES[cfg.schedule](min(max(progress, 0.0), 1.0), cfg)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * left


def decay_progress(it: int, warmup_iters: int, max_iters: int) -> float:
    """How far iteration `it` is through the post-warm-up iterations: 0 at the first, which runs at the peak lr, and
    1 at the last (`max_iters - 1`), which runs at min_lr. A single one runs at the peak."""
    if max_iters - 1 <= warmup_iters:
        return 0.0
    return (it - warmup_iters) / (max_iters - 1 - warmup_iters)


def set_lr(optimizer: torch.optim.Optimizer | MultiOptimizer, lr: float) -> None:
    """Set the scheduled learning rate; groups with an `lr_scale` (Muon's) get it scaled."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
