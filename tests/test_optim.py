"""Optimizer construction and the learning-rate schedules."""

import logging
import math

import pytest
import torch

from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.optim import OptimConfig, build_optimizer, decay_progress, lr_at
from fluxtrain.train import train

from .conftest import tb_scalars


def schedule(it: int, cfg: OptimConfig, max_iters: int) -> float:
    return lr_at(it, decay_progress(it, cfg.warmup_iters, max_iters), cfg)


def test_schedule_values():
    cfg = OptimConfig(lr=1e-3, warmup_iters=100, min_lr=1e-4)
    assert schedule(0, cfg, 1101) == pytest.approx(1e-3 / 101)  # the first step already learns
    assert schedule(50, cfg, 1101) == pytest.approx(1e-3 * 51 / 101)
    assert schedule(99, cfg, 1101) == pytest.approx(1e-3 * 100 / 101)
    assert schedule(100, cfg, 1101) == pytest.approx(1e-3)  # end of warm-up: the peak
    assert schedule(600, cfg, 1101) == pytest.approx((1e-3 + 1e-4) / 2)  # middle of the cosine
    assert schedule(1100, cfg, 1101) == pytest.approx(1e-4)  # the last step: min_lr
    values = [schedule(i, cfg, 1101) for i in range(100, 1101)]
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


def test_linear_and_wsd_schedules():
    linear = OptimConfig(lr=1e-3, warmup_iters=100, min_lr=1e-4, schedule="linear")
    assert schedule(100, linear, 1101) == pytest.approx(1e-3)
    assert schedule(600, linear, 1101) == pytest.approx((1e-3 + 1e-4) / 2)
    assert schedule(850, linear, 1101) == pytest.approx(1e-4 + 0.25 * 9e-4)
    assert schedule(1100, linear, 1101) == pytest.approx(1e-4)
    wsd = OptimConfig(lr=1e-3, warmup_iters=100, min_lr=1e-4, schedule="wsd", decay_frac=0.2)
    assert schedule(50, wsd, 1101) == pytest.approx(1e-3 * 51 / 101)  # the same warm-up
    assert schedule(800, wsd, 1101) == pytest.approx(1e-3)  # held until the last 20% of the budget after the warm-up
    assert schedule(900, wsd, 1101) == pytest.approx(1e-3)
    assert schedule(1000, wsd, 1101) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the decay
    assert schedule(1100, wsd, 1101) == pytest.approx(1e-4)
    for cfg in (linear, wsd):
        values = [schedule(i, cfg, 1101) for i in range(100, 1101)]
        assert all(a >= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "sgdd"}, "optim.name='sgdd' is not one of"),
        ({"schedule": "cosin"}, "optim.schedule='cosin' is not one of cosine, linear, wsd"),
        ({"schedule": "wsd", "decay_frac": 0.0}, r"optim.decay_frac=0.0 must be in \(0, 1\]"),
        ({"decay_frac": 1.5}, r"optim.decay_frac=1.5 must be in \(0, 1\]"),
        ({"weight_decay": -0.5}, r"optim.weight_decay=-0.5 must be >= 0"),
        ({"grad_clip": -1.0}, r"optim.grad_clip=-1.0 must be >= 0 \(0 turns clipping off\)"),
        # NaN passes every range check: each non-finite value is refused by its own name.
        ({"lr": math.nan}, "optim.lr=nan must be a finite number"),
        ({"lr": math.inf}, "optim.lr=inf must be a finite number"),
        ({"weight_decay": math.nan}, "optim.weight_decay=nan must be a finite number"),
        ({"grad_clip": math.nan}, "optim.grad_clip=nan must be a finite number"),
        ({"name": "muon", "muon_lr": math.nan}, "optim.muon_lr=nan must be a finite number"),
        # Unused by adamw, but a sweep over optim.name would reach them: checked with any optimizer.
        ({"muon_lr": -1.0}, r"optim.muon_lr=-1.0 must be positive"),
        ({"muon_momentum": 5.0}, r"optim.muon_momentum=5.0 must be in \[0, 1\)"),
        ({"warmup_iters": -1}, r"optim.warmup_iters=-1 must be an integer >= 0"),
        # Wrong types from Python, where no Hydra schema checks them: one line, not torch's or math's TypeError.
        ({"lr": "x"}, r"^optim.lr='x' must be a finite number$"),
        ({"weight_decay": None}, r"^optim.weight_decay=None must be a finite number$"),
        ({"grad_clip": True}, r"^optim.grad_clip=True must be a finite number$"),
        ({"warmup_iters": 2.5}, r"^optim.warmup_iters=2.5 must be an integer >= 0$"),
        ({"warmup_iters": "10"}, r"^optim.warmup_iters='10' must be an integer >= 0$"),
        ({"name": ["adam"]}, r"^optim.name=\['adam'\] is not one of adam, adamw, muon$"),
        ({"schedule": None}, r"^optim.schedule=None is not one of cosine, linear, wsd$"),
        ({"betas": 0.9}, r"^optim.betas=0.9 must be two numbers in \[0, 1\)$"),
        ({"betas": "ab"}, r"^optim.betas='ab' must be two numbers in \[0, 1\)$"),
        ({"betas": (0.9, "0.99")}, r"^optim.betas=\[0.9, '0.99'\] must be two numbers in \[0, 1\)$"),
    ],
)
def test_bad_optimizer_settings_are_named(overrides, message):
    model = GPT(ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, seq_len=8), 7)
    with pytest.raises(FluxtrainError, match=message):
        build_optimizer(model, OptimConfig(**{"name": "adamw", **overrides}))


def test_trainer_follows_the_wsd_schedule(tiny_cfg, tmp_path):
    """The learning rates a run logs: warm-up, held at the peak, then a straight line down over the last half."""
    cfg = tiny_cfg(
        "train.max_iters=22",
        "train.log_interval=1",
        "train.eval_interval=1000",
        "optim.lr=1e-3",
        "optim.warmup_iters=2",
        "optim.schedule=wsd",
        "optim.decay_frac=0.5",
    )
    train(cfg, tmp_path / "run")
    logged = tb_scalars(tmp_path / "run", "lr")
    assert sorted(logged) == list(range(1, 23))  # step s logs the lr of iteration s - 1
    assert logged[1] == pytest.approx(1e-3 / 3) and logged[2] == pytest.approx(2e-3 / 3)
    for it in range(2, 22):
        # 20 iterations after the warm-up, 2..21: held to the middle (11.5), then down to 0 at the last one
        expected = min(1e-3, 1e-3 * 2 * (21 - it) / 19)
        assert logged[it + 1] == pytest.approx(expected, rel=1e-6), it


def test_a_warmup_longer_than_the_run_is_warned_about(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg("train.max_iters=4", "train.eval_interval=4"), tmp_path / "run")
    assert "optim.warmup_iters=5 >= train.max_iters=4: the learning rate stays below optim.lr=0.003" in caplog.text


def test_a_warmup_that_leaves_one_iteration_is_warned_about(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg("train.max_iters=6", "train.eval_interval=6"), tmp_path / "run")
    assert (
        "optim.warmup_iters=5 leaves one iteration of train.max_iters=6 after the warm-up: it runs at optim.lr=0.003, "
        "and the schedule never decays to optim.min_lr" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg("train.max_iters=7", "train.eval_interval=7"), tmp_path / "decays")
    assert "warm-up" not in caplog.text


def test_a_single_iteration_after_the_warm_up_runs_at_the_peak():
    cfg = OptimConfig(lr=1e-3, warmup_iters=0, min_lr=0.0)
    assert schedule(0, cfg, 1) == pytest.approx(1e-3)  # a one-step run learns
    assert schedule(4, OptimConfig(lr=1e-3, warmup_iters=4, min_lr=0.0), 5) == pytest.approx(1e-3)
