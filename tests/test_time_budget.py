"""train.max_time: the run ends within its budget, final eval included, with the cosine laid over the time."""

import logging
import re
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fluxtrain.train as train_module
from fluxtrain import time_budget
from fluxtrain.checkpoint import load_checkpoint
from fluxtrain.errors import FluxtrainError
from fluxtrain.resume import checkpoint_path
from fluxtrain.time_budget import TimeBudget
from fluxtrain.train import train


def train_with_threads_restored(cfg, run_dir, caplog):
    """Train (`train.threads` set) and give torch back its threads; returns the metrics, the `iter` log lines and the
    run's TensorBoard events."""
    threads = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="fluxtrain"):
            metrics = train(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return metrics, [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter ")], events


@pytest.mark.slow
def test_time_budget_ends_the_run_and_the_schedule_reaches_min_lr(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg(
        "train.max_iters=1000000",
        "train.max_time=10",
        "train.eval_interval=1000000",
        "train.eval_iters=20",
        "train.log_interval=1",
        "optim.lr=3e-3",
        "optim.min_lr=3e-4",
        "train.threads=1",  # steady step times on a busy machine
    )
    metrics, lines, events = train_with_threads_restored(cfg, tmp_path / "run", caplog)
    assert 10 < metrics["iters"] < 1_000_000
    # Its log lines count the seconds of the budget, not toward train.max_iters, which the run does not reach.
    assert re.match(r"iter      1 \| 0/\d+s \| loss ", lines[0]) and not any("/1000000" in line for line in lines)
    # The final eval and saving are inside the budget; a little slack for a busy machine.
    assert metrics["wall_time_sec"] < 10 + 3.0
    lrs = [e.value for e in events.Scalars("lr")]
    assert max(lrs) > 2.5e-3  # warm-up reached the peak
    assert lrs[-1] < 3e-4 + 0.1 * (3e-3 - 3e-4)  # and the cosine ran down to min_lr by the end of the time


def test_the_steps_after_the_last_log_line_are_logged_when_the_time_runs_out(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg(
        "train.max_iters=1000000", "train.max_time=3", "train.log_interval=1000000", "optim.min_lr=1e-4",
        "train.eval_interval=1000000", "train.threads=1",
    )  # fmt: skip
    metrics, lines, events = train_with_threads_restored(cfg, tmp_path / "run", caplog)
    assert len(lines) == 1 and lines[0].startswith(f"iter {metrics['iters']:>6} | ")
    for tag in ("train/loss", "lr", "throughput/tokens_per_sec"):
        assert [e.step for e in events.Scalars(tag)] == [metrics["iters"]]
    assert events.Scalars("throughput/tokens_per_sec")[0].value == pytest.approx(metrics["tokens_per_sec"])
    assert events.Scalars("lr")[0].value == pytest.approx(1e-4, rel=0.2)  # the schedule's end, at the last step


def test_validation_only_evaluation(tiny_cfg, tmp_path, caplog):
    """train.eval_train=false measures only the validation split: no training-batch loss in the log, the metrics or
    TensorBoard, and the same val loss as an evaluation of both splits (the same val batches)."""
    both = train(tiny_cfg("train.max_iters=6", "train.eval_interval=3"), tmp_path / "both")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        val_only = train(
            tiny_cfg("train.max_iters=6", "train.eval_interval=3", "train.eval_train=false"), tmp_path / "val"
        )
    assert val_only["final_train_loss"] is None and both["final_train_loss"] is not None
    assert val_only["final_val_loss"] == both["final_val_loss"]
    evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval ")]
    assert len(evals) == 2 and all("| val " in e and "| train " not in e for e in evals)
    events = EventAccumulator(str(tmp_path / "val"))
    events.Reload()
    assert "val/loss" in events.Tags()["scalars"] and "train/eval_loss" not in events.Tags()["scalars"]


def test_a_budget_spent_before_training_starts_is_an_error_naming_it(tiny_cfg, tmp_path):
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg("train.max_time=0.001"), tmp_path)
    message = str(info.value)
    assert message.startswith("train.max_time=0.001 leaves no time to train after setup (")
    assert "and the final evaluation (~" in message and "with train.eval_iters=4)" in message
    assert not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "checkpoints").exists()


def test_the_time_spent_timing_the_final_evaluation_is_setup_not_training_time(tiny_cfg, tmp_path, monkeypatch):
    """Timing the final evaluation takes 0.3 s here, and the budget leaves 0.1 s after the setup before it: no time
    to train, so the run is refused at setup rather than run for 0 iterations."""
    started = []
    real_load_resume = train_module.load_resume

    def load_resume(*args):  # called as the setup that train.max_time counts starts
        started.append(time.perf_counter())
        return real_load_resume(*args)

    def eval_seconds(*args):
        final_eval = 60 - (time.perf_counter() - started[0]) - 0.1
        time.sleep(0.3)
        return final_eval

    monkeypatch.setattr(train_module, "load_resume", load_resume)
    monkeypatch.setattr(time_budget, "eval_seconds", eval_seconds)
    with pytest.raises(FluxtrainError, match=r"^train.max_time=60.0 leaves no time to train after setup \("):
        train(tiny_cfg("train.max_time=60"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_budget_that_leaves_less_than_one_step_is_refused_and_one_step_is_always_taken(
    tiny_cfg, tmp_path, monkeypatch
):
    # A forward pass "takes" 1 s, so a step about 3 s; the budget leaves about 2 s after the setup and final evaluation.
    started = []
    real_load_resume = train_module.load_resume

    def load_resume(*args):
        started.append(time.perf_counter())
        return real_load_resume(*args)

    monkeypatch.setattr(train_module, "load_resume", load_resume)
    monkeypatch.setattr(time_budget, "forward_seconds", lambda *args: 1.0)
    monkeypatch.setattr(time_budget, "eval_seconds", lambda *args: 60 - (time.perf_counter() - started[0]) - 2.0)
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg("train.max_time=60"), tmp_path / "refused")
    assert re.match(
        r"train.max_time=60.0 leaves [12]\.\d\ds, less than one training step \(~3\.00s\), to train", str(info.value)
    )
    assert not (tmp_path / "refused" / "checkpoints").exists()
    # Time that the plan found but the folder's setup used up: the session still takes its first step, then stops.
    monkeypatch.setattr(train_module, "plan_time_budget", lambda *args: TimeBudget(1e-9, 0.0))
    assert train(tiny_cfg("train.max_time=60", "train.max_iters=1000"), tmp_path / "sliver")["iters"] == 1


def test_an_iteration_budget_that_ends_first_still_runs_the_schedule_down(tiny_cfg, tmp_path):
    # 12 iterations end the run long before its 600 s: the linear decay follows the iterations, as without a time
    # budget, and reaches min_lr (0) at the last one.
    cfg = tiny_cfg(
        "train.max_iters=12",
        "train.max_time=600",
        "train.log_interval=1",
        "optim.warmup_iters=2",
        "optim.schedule=linear",
        "optim.lr=1e-3",
        "optim.min_lr=0",
    )
    assert train(cfg, tmp_path)["iters"] == 12
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    lrs = [e.value for e in events.Scalars("lr")]
    # the lr logged at iteration i is that of step i - 1: warm-up 1/3, 2/3 of the peak, then (11 - i) / 9 of it
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3] + [1e-3 * (11 - i) / 9 for i in range(2, 12)], rel=1e-5)


def test_a_warm_up_the_time_budget_cannot_finish_is_warned_about(tiny_cfg, tmp_path, monkeypatch, caplog):
    # Half a second to train, whatever the setup took: the warm-up of 100,000 iterations cannot end in it.
    monkeypatch.setattr(train_module, "plan_time_budget", lambda *args: TimeBudget(0.5, 0.0))
    cfg = tiny_cfg("train.max_iters=1000000", "train.max_time=600", "optim.warmup_iters=100000")
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        metrics = train(cfg, tmp_path)
    warned = [r.getMessage() for r in caplog.records if "fewer than optim.warmup_iters=100000" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert warned[0].startswith("train.max_time=600 leaves time for about ")
    advice = "(lower optim.warmup_iters, or raise train.max_time)"
    assert warned[0].endswith(f"the learning rate stays below optim.lr=0.003 for the whole run {advice}")
    # Judged from the pace of the first steps: of the order of the iterations the half second gave (loosely: a busy
    # machine may slow some steps down several times).
    reachable = int(re.search(r"about ([\d,]+) iterations", warned[0])[1].replace(",", ""))
    assert metrics["iters"] / 10 <= reachable <= 10 * metrics["iters"]


def test_an_iteration_budget_shorter_than_the_warm_up_is_warned_about_with_a_time_budget_too(
    tiny_cfg, tmp_path, caplog
):
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg("train.max_iters=4", "train.max_time=600", "optim.warmup_iters=5"), tmp_path)
    assert "optim.warmup_iters=5 >= train.max_iters=4: the learning rate stays below optim.lr=0.003" in caplog.text


def test_a_run_whose_time_ran_out_stays_finished_when_a_shorter_setup_leaves_more_time(
    tiny_cfg, tmp_path, monkeypatch, caplog
):
    """The budget's training time is planned anew each session from that session's setup, which a warm cache
    shortens: a finished run requeued with the same train.max_time must not find time to train on. Raised, it
    trains on."""
    run = ["train.max_time=60", "train.max_iters=1000000", "train.eval_interval=1000000", "train.ckpt_interval=5"]
    monkeypatch.setattr(train_module, "plan_time_budget", lambda *args: TimeBudget(2.0, 0.0))
    first = train(tiny_cfg(*run), tmp_path)
    assert 1 < first["iters"] < 1_000_000
    assert load_checkpoint(checkpoint_path(tmp_path, first["iters"])).progress.time_ran_out

    faster_setup = TimeBudget(5.0, 0.0)  # a faster setup this time
    monkeypatch.setattr(train_module, "plan_time_budget", lambda *args: faster_setup)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        again = train(tiny_cfg(*run, "resume=auto"), tmp_path)
    assert again == first and f"the run finished at iteration {first['iters']}" in caplog.text
    assert "(raise train.max_time to train on)" in caplog.text  # a larger max_iters would not
    # Without its results they are written again, from the checkpoint's evaluation, and it is still not trained.
    (tmp_path / "metrics.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        evaluated = train(tiny_cfg(*run, "resume=auto"), tmp_path)
    assert evaluated["iters"] == first["iters"] and "its evaluation there stands, with nothing to train" in caplog.text
    # A larger budget trains on, for the time the new one adds (however long the first session's steps took).
    trained = load_checkpoint(checkpoint_path(tmp_path, first["iters"])).progress.train_time
    monkeypatch.setattr(train_module, "plan_time_budget", lambda *args: TimeBudget(trained + 0.5, 0.0))
    longer = train(tiny_cfg(*(s.replace("max_time=60", "max_time=61") for s in run), "resume=auto"), tmp_path)
    assert longer["iters"] > first["iters"]


def test_an_evaluation_slower_than_planned_keeps_its_time_for_the_final_one(tiny_cfg, tmp_path, monkeypatch):
    """Planned at setup with no time for the final evaluation, the loop gets 4 s; its first evaluation takes 2 s
    (a machine busier than at setup), so the final one, of as many batches, is kept 2.2 s of them."""
    budget = TimeBudget(4.0, 0.0)
    assert budget.keep_for_final_eval(2.0) == pytest.approx(2.2) and budget.final_eval == pytest.approx(2.2)
    assert budget.keep_for_final_eval(0.1) == 0.0 and budget.final_eval == pytest.approx(2.2)  # never less

    real_estimate_loss, calls = train_module.estimate_loss, []

    def estimate_loss(*args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2.0)
        return real_estimate_loss(*args)

    monkeypatch.setattr(train_module, "estimate_loss", estimate_loss)
    monkeypatch.setattr(train_module, "plan_time_budget", lambda *args: TimeBudget(4.0, 0.0))
    run = ["train.max_time=60", "train.max_iters=1000000", "train.eval_interval=2", "train.eval_iters=1"]
    result = train(tiny_cfg(*run), tmp_path)
    trained = load_checkpoint(checkpoint_path(tmp_path, result["iters"])).progress.train_time
    assert 1.8 <= trained < 3.0  # the loop's 4 s, less the 2.2 s now kept (a step and an evaluation may pass it)
