"""Optimizer construction and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fluxtrain.errors import FluxtrainError

OPTIMIZERS = ("adam", "adamw")


@dataclass
class OptimConfig:
    name: str = "adam"  # adam (torch.optim.Adam) | adamw
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_iters: int = 100
    min_lr: float = 0.0


def validate(cfg: OptimConfig) -> None:
    if cfg.name not in OPTIMIZERS:
        raise FluxtrainError(f"optim.name={cfg.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if cfg.lr <= 0:
        raise FluxtrainError(f"optim.lr={cfg.lr} must be positive")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise FluxtrainError(f"optim.betas={list(cfg.betas)} must be two numbers in [0, 1)")
    if cfg.warmup_iters < 0:
        raise FluxtrainError(f"optim.warmup_iters={cfg.warmup_iters} must be >= 0")
    if not 0.0 <= cfg.min_lr <= cfg.lr:
        raise FluxtrainError(f"optim.min_lr={cfg.min_lr} must be between 0 and optim.lr={cfg.lr}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and embeddings' 1-D parameters are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    validate(cfg)
    groups = param_groups(model, cfg.weight_decay)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas)
    return torch.optim.Adam(groups, lr=cfg.lr, betas=betas)


def lr_at(it: int, progress: float, cfg: OptimConfig) -> float:
    """Learning rate at iteration `it`: linear warm-up over `warmup_iters`, then cosine from lr to min_lr.

    `progress` in [0, 1] is how far the run is through its budget (iterations, or seconds with a time budget);
    the cosine covers the part of the budget after the warm-up.
    """
    if it < cfg.warmup_iters:
        return cfg.lr * it / cfg.warmup_iters
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def cosine_progress(it: int, warmup_iters: int, max_iters: int) -> float:
    """Fraction of the post-warm-up iterations done at iteration `it`."""
    if max_iters <= warmup_iters:
        return 1.0
    return (it - warmup_iters) / (max_iters - warmup_iters)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
