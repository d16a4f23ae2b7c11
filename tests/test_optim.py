"""Optimizer construction and the warm-up + cosine schedule."""

import math

import pytest
import torch

from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.optim import OptimConfig, build_optimizer, cosine_progress, lr_at


def schedule(it: int, cfg: OptimConfig, max_iters: int) -> float:
    return lr_at(it, cosine_progress(it, cfg.warmup_iters, max_iters), cfg)


def test_schedule_values():
    cfg = OptimConfig(lr=1e-3, warmup_iters=100, min_lr=1e-4)
    assert schedule(0, cfg, 1100) == 0.0
    assert schedule(50, cfg, 1100) == pytest.approx(5e-4)
    assert schedule(100, cfg, 1100) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert schedule(600, cfg, 1100) == pytest.approx((1e-3 + 1e-4) / 2)  # middle of the cosine
    assert schedule(1100, cfg, 1100) == pytest.approx(1e-4)  # end: min_lr
    values = [schedule(i, cfg, 1100) for i in range(100, 1101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_time_based_progress_uses_the_same_curve():
    cfg = OptimConfig(lr=2e-3, warmup_iters=0, min_lr=0.0)
    assert lr_at(10, 0.25, cfg) == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_adam_is_torch_adam_and_adamw_decays_matrices_only():
    model = GPT(ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, seq_len=8), 7)
    assert type(build_optimizer(model, OptimConfig())) is torch.optim.Adam
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.1))
    assert type(opt) is torch.optim.AdamW
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


def test_unknown_optimizer_is_named():
    model = GPT(ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, seq_len=8), 7)
    with pytest.raises(FluxtrainError, match="optim.name='sgdd' is not one of"):
        build_optimizer(model, OptimConfig(name="sgdd"))
