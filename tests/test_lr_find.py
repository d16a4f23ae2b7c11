"""The learning-rate range test: the suggestion rules, a real run on a tiny model, the PNG and the command line."""

from __future__ import annotations

import importlib
import json
import logging

import numpy as np
import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fluxtrain.__main__ import lr_find_main
from fluxtrain.errors import FluxtrainError
from fluxtrain.lr_find import MIN_DROP, ema, lr_find, relative_drop, suggest_lr, zero_lag_smooth
from fluxtrain.train import train

from .conftest import REPO_ROOT, TINY_OVERRIDES, run_fluxtrain

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_curve(lrs: np.ndarray, centre: float, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A loss that falls from 4 to 1.5 along a logistic in log10(lr) centred at `centre`, then explodes above 0.1."""
    x = np.log10(lrs)
    loss = 1.5 + 2.5 / (1 + np.exp(4 * (x - np.log10(centre)))) + np.where(lrs > 0.1, 30 * (x + 1), 0)
    return loss + noise * np.random.default_rng(seed).standard_normal(len(lrs))


def test_steepest_rule_finds_the_steepest_point_without_lag():
    lrs = np.geomspace(1e-7, 1, 300)
    loss = synthetic_curve(lrs, centre=1e-3, noise=0.05)
    smoothed = zero_lag_smooth(loss, 0.9)
    # The logistic is steepest at its centre; a plain EMA would place it later (at a higher LR).
    assert suggest_lr(lrs, smoothed, "steepest") == pytest.approx(1e-3, rel=0.35)
    assert suggest_lr(lrs, ema(loss, 0.9), "steepest") > 1.3e-3


def test_min_rule_is_a_tenth_of_the_minimum():
    lrs = np.geomspace(1e-7, 1, 300)
    smoothed = zero_lag_smooth(synthetic_curve(lrs, centre=1e-3), 0.9)
    i_min = int(np.argmin(smoothed))
    assert 1e-2 < lrs[i_min] <= 0.1 + 1e-9  # the flat bottom before the explosion
    assert suggest_lr(lrs, smoothed, "min_div_10") == pytest.approx(lrs[i_min] / 10)


# The raw losses of `task=lr_find model=small lr_find.num_steps=30` on Tiny Shakespeare: the loss fell by a quarter,
# but the explosion at the end smooths back over the whole short curve, leaving a minimum 0.002 below the start.
REPORTED_30_STEPS = [
    4.19, 4.22, 4.21, 4.15, 4.23, 4.2, 4.15, 4.19, 4.2, 4.19, 4.21, 4.13, 4.14, 4.06, 4.0,
    3.91, 3.81, 3.81, 3.57, 3.53, 3.43, 3.15, 3.85, 3.72, 4.1, 15.46, 4.75, 6.98, 6.74, 17.26,
]  # fmt: skip


@pytest.mark.parametrize("rule", ["steepest", "min_div_10"])
def test_a_clear_valley_in_a_short_sweep_gives_a_suggestion(rule):
    lrs = np.geomspace(1e-7, 1, 30)
    smoothed = zero_lag_smooth(synthetic_curve(lrs, centre=1e-3, noise=0.03), 0.9)
    assert relative_drop(smoothed) > 2 * MIN_DROP
    assert 1e-4 < suggest_lr(lrs, smoothed, rule) < 1e-2


@pytest.mark.parametrize("rule", ["steepest", "min_div_10"])
@pytest.mark.parametrize("num_steps, seed", [(30, 0), (30, 1), (30, 4), (300, 0), (300, 2)])
def test_a_flat_noisy_curve_gives_no_suggestion(rule, num_steps, seed):
    # The noise has a minimum somewhere: it was suggested, e.g. lr_find.end_lr=1 for 30 steps with seed 4.
    lrs = np.geomspace(1e-7, 1, num_steps)
    loss = 4.0 + 0.1 * np.random.default_rng(seed).standard_normal(num_steps)
    assert suggest_lr(lrs, zero_lag_smooth(loss, 0.9), rule) is None


def test_the_reported_short_sweep_gives_no_suggestion_until_less_smoothing():
    lrs = np.geomspace(1e-7, 1, 30)
    smoothed = zero_lag_smooth(np.array(REPORTED_30_STEPS), 0.9)
    assert relative_drop(smoothed) < 0.001 and int(np.argmin(smoothed)) < 10  # a minimum before the descent
    assert suggest_lr(lrs, smoothed, "steepest") is None  # was 5.3e-07, near lr_find.start_lr=1e-7
    # The remedy the error names: with lr_find.smoothing=0.5 the descent shows and the suggestion is in it.
    assert 1e-4 < suggest_lr(lrs, zero_lag_smooth(np.array(REPORTED_30_STEPS), 0.5), "steepest") < 1e-2


def test_ema_is_bias_corrected():
    assert ema(np.full(5, 3.0), 0.98) == pytest.approx(np.full(5, 3.0))


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr_find.rule=valley", "lr_find.rule='valley' is not one of steepest, min_div_10"),
        ("lr_find.start_lr=2.0", "lr_find.start_lr=2.0 must be positive and below lr_find.end_lr=1.0"),
        ("lr_find.num_steps=5", "lr_find.num_steps=5 must be at least 10"),
        ("lr_find.stop_factor=1.0", "lr_find.stop_factor=1.0 must be greater than 1"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 must be >= 0"),
    ],
)
def test_bad_settings_name_the_setting(tiny_cfg, tmp_path, override, message):
    with pytest.raises(FluxtrainError) as e:
        lr_find(tiny_cfg(override), tmp_path / "run")
    assert str(e.value) == message
    assert not (tmp_path / "run").exists()  # nothing written before the error


def test_its_settings_may_name_other_settings(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_iters=12", "lr_find.num_steps=${train.max_iters}", "lr_find.end_lr=10")
    with pytest.raises(FluxtrainError, match="raise lr_find.num_steps=12 "):  # too short a curve for a suggestion
        lr_find(cfg, tmp_path)
    assert len(json.loads((tmp_path / "lr_find.json").read_text())["lrs"]) == 12


@pytest.mark.slow
def test_lr_find_on_a_tiny_model(tiny_cfg, tmp_path, caplog):
    # 100 steps over 6 decades instead of 300 over 7, to keep the test short; the loss explodes before 10.
    # With a recipe's training-only settings, each of which is said not to apply here, not silently dropped.
    recipe = ["train.batch_threads=2", "train.compile=true", "train.max_time=60", "train.precision=fp16"]
    cfg = tiny_cfg("lr_find.num_steps=100", "lr_find.start_lr=1e-5", "lr_find.end_lr=10", *recipe)
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        result = lr_find(cfg, tmp_path)
    assert "lr_find: train.batch_threads=2 is for training; the test runs on torch's threads" in caplog.text
    assert "lr_find: train.compile=true is for training; the test runs eagerly" in caplog.text
    assert "lr_find: train.max_time=60 is for training; the test runs lr_find.num_steps steps" in caplog.text
    assert "train.precision=fp16 needs CUDA; the test runs in fp32 on cpu" in caplog.text
    assert 1e-4 <= result.suggested_lr <= 1e-1
    # The loss fell well below the uniform guess (ln 39 = 3.66) and the test stopped once it exploded.
    assert min(result.smoothed) < 3.3
    assert result.stopped_early and len(result.losses) < 100 and result.lrs[-1] < 10
    png = tmp_path / "lr_find.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = imread(png).shape
    assert (width, height) == (700, 450)
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["suggested_lr"] == result.suggested_lr and len(saved["lrs"]) == len(result.losses)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("lr_find/loss")] == pytest.approx(result.losses, rel=1e-6)
    assert "lr_find/curve" in events.Tags()["images"]


def test_a_curve_that_never_falls_is_saved_and_the_error_says_what_to_change(tiny_cfg, tmp_path):
    # 12 steps from a learning rate already too high: the loss only rises.
    cfg = tiny_cfg("lr_find.num_steps=12", "lr_find.start_lr=1", "lr_find.end_lr=100", "lr_find.stop_factor=1000")
    with pytest.raises(FluxtrainError) as e:
        lr_find(cfg, tmp_path)
    message = str(e.value)
    assert message.startswith("lr_find: no suggestion, the smoothed loss fell by only 0.0% (needs 5%) to its minimum")
    assert f"(curve in {tmp_path / 'lr_find.png'})" in message and len(message.splitlines()) == 1
    assert "raise lr_find.num_steps=12 or lower lr_find.smoothing=0.9" in message
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["suggested_lr"] is None and len(saved["losses"]) >= 3
    assert saved["losses"][-1] > saved["losses"][0]
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_lr_find_command(tiny_text_file, tmp_path):
    """The `fluxtrain-lr-find` entry point runs the test and prints the suggestion with its rule."""
    proc = run_fluxtrain(
        *TINY_OVERRIDES,
        "lr_find.num_steps=30",
        "lr_find.start_lr=1e-4",
        f"data.path={tiny_text_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        entry=("-c", "from fluxtrain.__main__ import lr_find_main; lr_find_main()"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    saved = json.loads((run / "lr_find.json").read_text())
    expected = f"suggested optim.lr={saved['suggested_lr']:.2e} (rule: steepest descent of the smoothed loss"
    assert expected in proc.stdout
    assert (run / "lr_find.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (run / "metrics.json").exists()  # it did not train


def test_console_script_runs_the_lr_finder_entry_point():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, name = scripts["fluxtrain-lr-find"].split(":")
    assert getattr(importlib.import_module(module), name) is lr_find_main


def test_unknown_task_is_a_one_line_error(tmp_path):
    proc = run_fluxtrain("task=finetune", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines[-1].endswith("error: task='finetune' is not one of train, lr_find"), lines
    assert "Traceback" not in proc.stdout + proc.stderr


def test_lr_find_command_checks_settings_in_one_line(tmp_path):
    proc = run_fluxtrain(
        "lr_find.num_step=100",
        f"hydra.run.dir={tmp_path / 'run'}",
        entry=("-c", "from fluxtrain.__main__ import lr_find_main; lr_find_main()"),
    )
    assert proc.returncode == 1
    assert proc.stderr == "error: lr_find.num_step is not a fluxtrain setting (did you mean lr_find.num_steps?)\n"
    assert not (tmp_path / "run").exists()


def test_lr_find_under_torchrun_is_refused(tiny_cfg, tmp_path, monkeypatch):
    from fluxtrain import distributed

    monkeypatch.setattr(distributed, "current_world", lambda: distributed.World(rank=0, local_rank=0, world_size=2))
    with pytest.raises(FluxtrainError, match="^task=lr_find runs in one process: start it with python, not torchrun$"):
        lr_find(tiny_cfg("task=lr_find"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_folder_holding_a_training_run_is_refused_before_any_work(tiny_cfg, tmp_path):
    train(tiny_cfg("train.max_iters=2", "train.eval_iters=1"), tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FluxtrainError) as info:
        lr_find(tiny_cfg("task=lr_find", "lr_find.num_steps=20"), tmp_path)
    assert str(info.value) == (
        f"{tmp_path} holds a training run, and task=lr_find writes its config, curve and events into its folder: "
        "give it a folder of its own (hydra.run.dir)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_tensorboard_logs_the_smoothed_curve_the_suggestion_is_read_from(tiny_cfg, tmp_path):
    """lr_find/smoothed_loss in TensorBoard is the zero-lag curve of lr_find.json and the PNG, whose steepest
    descent is the suggestion; a forward EMA would lag behind it, towards higher learning rates."""
    cfg = tiny_cfg("lr_find.num_steps=30", "lr_find.start_lr=1e-4", "lr_find.end_lr=10", "lr_find.smoothing=0.7")
    result = lr_find(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    logged = np.array([e.value for e in events.Scalars("lr_find/smoothed_loss")])
    assert [e.step for e in events.Scalars("lr_find/smoothed_loss")] == list(range(len(result.lrs)))
    assert logged == pytest.approx(result.smoothed, rel=1e-6)
    assert logged != pytest.approx(ema(np.array(result.losses), 0.7), rel=1e-6)
    assert suggest_lr(np.array(result.lrs), logged, "steepest") == pytest.approx(result.suggested_lr, rel=1e-6)


def test_with_muon_the_suggestion_names_muons_lr_at_the_ratio_it_was_tested(tiny_cfg, tmp_path, caplog):
    """Muon's lr rises with the tested lr (optim.muon_lr / optim.lr = 20 here), so the loss curve is read at both:
    the suggestion gives both, or training at the suggested optim.lr would run Muon at another lr than tested."""
    cfg = tiny_cfg(
        "optim.name=muon",
        "optim.lr=1e-3",
        "optim.muon_lr=0.02",
        "lr_find.num_steps=30",
        "lr_find.start_lr=1e-4",
        "lr_find.end_lr=10",
        "lr_find.smoothing=0.7",
    )
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        result = lr_find(cfg, tmp_path)
    assert "Muon's lr rises with the tested lr at optim.muon_lr / optim.lr = 20" in caplog.text
    assert result.suggested_lr is not None
    assert result.suggested_muon_lr == pytest.approx(20 * result.suggested_lr)
    assert f"optim.lr={result.suggested_lr:.2e} optim.muon_lr={result.suggested_muon_lr:.2e} (rule" in caplog.text
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["suggested_muon_lr"] == result.suggested_muon_lr


def test_a_folder_holding_an_earlier_lr_find_is_refused(tiny_cfg, tmp_path):
    """Its events would stay beside the new ones: TensorBoard would draw one curve from two tests, and show both
    suggestions."""
    cfg = tiny_cfg("lr_find.num_steps=30", "lr_find.start_lr=1e-4", "lr_find.end_lr=10", "lr_find.smoothing=0.7")
    lr_find(cfg, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(FluxtrainError) as info:
        lr_find(cfg, tmp_path)
    assert str(info.value).startswith(f"{tmp_path} holds an earlier lr_find's curve and events: give this one")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_events_that_cannot_be_written_end_the_test_in_one_line(tiny_cfg, tmp_path, full_disk_after_20_events, capfd):
    """A full disk under TensorBoard's writer thread, as in training: one line naming the event file."""
    from fluxtrain.files import WriteError

    with pytest.raises(WriteError) as info:
        lr_find(tiny_cfg("task=lr_find", "lr_find.num_steps=100"), tmp_path)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    assert str(info.value) == f"cannot write {events}: No space left on device"
    assert full_disk_after_20_events == [] and "Traceback" not in capfd.readouterr().err
