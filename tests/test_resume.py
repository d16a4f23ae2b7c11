"""Resuming runs: bit-exact continuation, TensorBoard steps, refused changes, SIGTERM on a real run, NaN stops."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.summary.writer import event_file_writer
from torch.utils.tensorboard import SummaryWriter

import fluxtrain.resume as resume_module
import fluxtrain.train as train_module
from fluxtrain.checkpoint import load_checkpoint
from fluxtrain.errors import FluxtrainError
from fluxtrain.interrupt import TrainingInterrupted
from fluxtrain.model_file import read_model_file
from fluxtrain.resume import (
    checkpoint_path,
    divergence_error,
    find_latest,
    list_checkpoints,
    path_override,
    resume_command,
    wait_for_a_later_event_file_name,
)
from fluxtrain.run_folder import remember_run_configs
from fluxtrain.runs import FINAL_MODEL_FILE
from fluxtrain.tasks import run_task
from fluxtrain.train import train

from .conftest import REPO_ROOT, TINY_OVERRIDES, poison_training_loss, run_fluxtrain

N = 10
# Dropout > 0 so the torch RNG matters; a log interval that does not divide N so the loss window spans the resume.
RUN = ["model.dropout=0.1", f"train.max_iters={2 * N}", "train.log_interval=3", "train.eval_interval=5"]
RUN += ["train.eval_iters=2", "train.batch_size=4", "train.keep_last=0"]
TAGS = ("train/loss", "val/loss", "lr")


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each tag as TensorBoard shows it: events a resumed run purged are left out."""
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_model_file(path)[1]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def interrupt_at(monkeypatch, iteration: int, signum: int = signal.SIGTERM) -> None:
    """Send this process `signum` while it trains iteration `iteration` (counted from 1)."""
    real_lr_at = train_module.lr_at

    def lr_at(it, progress, cfg):
        if it == iteration - 1:
            os.kill(os.getpid(), signum)
        return real_lr_at(it, progress, cfg)

    monkeypatch.setattr(train_module, "lr_at", lr_at)


@pytest.mark.slow
def test_interrupted_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_cfg, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(*RUN, f"train.ckpt_interval={N}"), straight)

    interrupt_at(monkeypatch, N)
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny_cfg(*RUN, "resume=auto"), resumed)  # nothing to resume yet: a fresh start
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert find_latest(resumed) == checkpoint_path(resumed, N)
    monkeypatch.undo()
    metrics = train(tiny_cfg(*RUN, "resume=auto"), resumed)

    assert metrics["iters"] == 2 * N
    expected = scalars(straight)
    assert [s for s, _ in expected["train/loss"]] == [3, 6, 9, 12, 15, 18, 20]
    assert scalars(resumed) == expected  # same steps, none twice, none missing; the same float32 values
    assert_same_weights(straight / "model_final.safetensors", resumed / "model_final.safetensors")
    assert_same_weights(straight / "best.safetensors", resumed / "best.safetensors")
    a, b = load_checkpoint(checkpoint_path(straight, 2 * N)), load_checkpoint(checkpoint_path(resumed, 2 * N))
    assert a.progress.best_val_loss == b.progress.best_val_loss
    for k in a.optimizer["state"][0]:
        assert torch.equal(a.optimizer["state"][0][k], b.optimizer["state"][0][k])
    assert torch.equal(a.rng["torch"], b.rng["torch"]) and torch.equal(a.rng["batches"], b.rng["batches"])

    # Going back to an older checkpoint in the same folder: later checkpoints are set aside, TensorBoard hides the
    # events logged after it, and the replayed steps give the same curve again.
    train(tiny_cfg(*RUN, f"resume={checkpoint_path(straight, N)}"), straight)
    assert (straight / "checkpoints" / "superseded" / "001" / f"iter_{2 * N:06d}.ckpt").is_file()
    assert scalars(straight) == expected
    assert len(list(straight.glob("events.out.tfevents.*"))) == 2


def test_a_later_session_event_file_sorts_after_the_earlier_one(tmp_path, monkeypatch):
    """TensorBoard reads event files in name order: a second session opened in the same second must still come
    last, although the per-process counter in the name goes 9, 10 and "10" sorts first."""
    uid = itertools.count(9)
    monkeypatch.setattr(event_file_writer._global_uid, "get", lambda: next(uid))
    time.sleep(1 - time.time() % 1)  # both writers in one second, unless the helper waits
    SummaryWriter(str(tmp_path)).close()
    wait_for_a_later_event_file_name(tmp_path)
    SummaryWriter(str(tmp_path)).close()
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert len(names) == 2 and names[-1].endswith(".10")


@pytest.mark.slow
def test_a_run_extended_with_a_larger_max_iters_matches_a_longer_run(tiny_cfg, tmp_path):
    # A constant learning rate after warm-up, so the schedule does not depend on train.max_iters.
    constant = [*RUN, "optim.min_lr=3e-3", "train.log_interval=5"]
    train(tiny_cfg(*constant), tmp_path / "long")
    train(tiny_cfg(*constant, f"train.max_iters={N}"), tmp_path / "short")
    metrics = train(tiny_cfg(*constant, "resume=auto", "train.ckpt_interval=7"), tmp_path / "short")
    assert metrics["iters"] == 2 * N
    assert scalars(tmp_path / "short") == scalars(tmp_path / "long")
    assert_same_weights(tmp_path / "long" / "model_final.safetensors", tmp_path / "short" / "model_final.safetensors")
    # keep_last=0 keeps every checkpoint: the end of the short run, the interval one and the end of the resumed run.
    assert sorted(p.name for p in (tmp_path / "short" / "checkpoints").glob("iter_*")) == [
        "iter_000010.ckpt",
        "iter_000014.ckpt",
        "iter_000020.ckpt",
    ]
    # The short run's final model and metrics described the checkpoint it went on from: nothing was set aside.
    assert not (tmp_path / "short" / "checkpoints" / "superseded").exists()


def test_resuming_a_finished_run_leaves_it_and_its_results_as_they_were(tiny_cfg, tmp_path, caplog):
    cfg = ["train.max_iters=10", "train.eval_interval=5", "train.eval_iters=2"]
    first = train(tiny_cfg(*cfg), tmp_path)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.log"}
    curves = scalars(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        again = train(tiny_cfg(*cfg, "optim.lr=1e-2", "resume=auto"), tmp_path)  # as a requeued job would
    assert f"the run finished at iteration 10, the checkpoint's: its results in {tmp_path / 'metrics.json'}" in (
        caplog.text
    )
    assert again == first  # nothing trained or evaluated: throughput and wall time included
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "train.log"} == files
    assert scalars(tmp_path) == curves  # no point logged twice at the last step


def test_a_finished_run_without_its_results_writes_them_again_without_training(tiny_cfg, tmp_path, caplog):
    cfg = ["train.max_iters=10", "train.eval_interval=5", "train.eval_iters=2"]
    first = train(tiny_cfg(*cfg), tmp_path)
    (tmp_path / "metrics.json").unlink()  # e.g. killed after its last checkpoint
    ckpt = checkpoint_path(tmp_path, 10)
    written = ckpt.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        again = train(tiny_cfg(*cfg, "resume=auto"), tmp_path)
    # The checkpoint holds the evaluation at its iteration: it stands, and is not run again
    assert "iteration 10, which reaches train.max_iters=10: its evaluation there stands, with nothing to train" in (
        caplog.text
    )
    assert again["iters"] == 10 and again["tokens_per_sec"] is None  # no step, so no throughput
    assert again["final_val_loss"] == first["final_val_loss"] and again["best_val_loss"] == first["best_val_loss"]
    assert ckpt.stat().st_mtime_ns == written  # the checkpoint of the finished run is kept as it was
    assert json.loads((tmp_path / "metrics.json").read_text())["final_val_loss"] == first["final_val_loss"]


@pytest.mark.parametrize("damaged", ["model_final.safetensors", "tokenizer.json"])
def test_a_finished_run_whose_final_model_or_tokenizer_is_damaged_writes_them_again(
    tiny_cfg, tmp_path, caplog, damaged
):
    cfg = ["train.max_iters=10", "train.eval_interval=5", "train.eval_iters=2"]
    first = train(tiny_cfg(*cfg), tmp_path)
    weights = {k: v.clone() for k, v in read_model_file(tmp_path / FINAL_MODEL_FILE)[1].items()}  # not the file's map
    tokenizer = (tmp_path / "tokenizer.json").read_text()
    whole = (tmp_path / damaged).read_bytes()
    (tmp_path / damaged).write_bytes(whole[: len(whole) // 2])  # e.g. truncated by a copy that ran out of room
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        again = train(tiny_cfg(*cfg, "resume=auto"), tmp_path)
    assert "the finished run's results do not stand (" in caplog.text and "writing them anew" in caplog.text
    assert again["final_val_loss"] == first["final_val_loss"]
    # written again from the checkpoint, as they were
    rewritten = read_model_file(tmp_path / FINAL_MODEL_FILE)[1]
    assert rewritten.keys() == weights.keys() and all(torch.equal(rewritten[k], weights[k]) for k in weights)
    assert (tmp_path / "tokenizer.json").read_text() == tokenizer


def test_throughput_after_a_resume_counts_only_the_steps_trained_since(tiny_cfg, tmp_path, monkeypatch, caplog):
    interrupt_at(monkeypatch, 5)  # the checkpoint holds the losses of iterations 4 and 5, logged at iteration 6
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg(*RUN), tmp_path)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(tiny_cfg(*RUN, "resume=auto"), tmp_path)
    per_step = int(re.search(r"tokens per optimizer step: ([\d,]+)", caplog.text)[1].replace(",", ""))
    its, toks = re.search(r"iter +6/20 .*\| ([\d.]+) it/s \| ([\d,]+) tok/s", caplog.text).groups()
    # it/s is printed to 0.1 and tok/s to 1: the two agree within those roundings, whatever the machine's speed
    assert float(its) * per_step == pytest.approx(float(toks.replace(",", "")), rel=0, abs=per_step * 0.05 + 0.5 + 1e-6)


def test_a_fresh_run_in_the_folder_of_an_earlier_one_sets_that_runs_checkpoints_results_and_curves_aside(
    tiny_cfg, tmp_path, caplog
):
    run = ["train.log_interval=5", "train.eval_interval=10", "train.ckpt_interval=10", "train.keep_last=0"]
    train(tiny_cfg(*run, "train.max_iters=30"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg(*run, "train.max_iters=10", "train.seed=7"), tmp_path)
    superseded = tmp_path / "checkpoints" / "superseded" / "001"
    assert (
        f"{tmp_path} holds an earlier run: moved its 3 checkpoint(s) and 8 result, tokenizer and event file(s) to "
        f"{superseded} and starting afresh (to continue that run instead, add resume={superseded / 'iter_000030.ckpt'} "
        "and another hydra.run.dir)"
    ) in caplog.text
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["iter_000010.ckpt"]  # the new run's only
    assert sorted(p.name for p in superseded.iterdir() if not p.name.startswith("events.")) == [
        "best.safetensors",
        "iter_000010.ckpt",
        "iter_000020.ckpt",
        "iter_000030.ckpt",
        "metrics.json",
        "model_final.safetensors",
        "model_iter_000010.safetensors",
        "model_iter_000020.safetensors",
        "model_iter_000030.safetensors",
        "tokenizer.json",
    ]
    assert json.loads((superseded / "metrics.json").read_text())["iters"] == 30  # the earlier run's results...
    assert json.loads((tmp_path / "metrics.json").read_text())["iters"] == 10  # ...are not the new run's
    assert [step for step, _ in scalars(tmp_path)["train/loss"]] == [5, 10]  # the earlier run's curves went along
    assert [step for step, _ in scalars(superseded)["train/loss"]] == [5, 10, 15, 20, 25, 30]
    # resume=auto now continues the new run, not the earlier one.
    metrics = train(tiny_cfg(*run, "train.max_iters=20", "train.seed=7", "resume=auto"), tmp_path)
    assert metrics["iters"] == 20 and [s for s, _ in scalars(tmp_path)["train/loss"]] == [5, 10, 15, 20]


def test_three_fresh_runs_in_one_folder_keep_every_runs_files(tiny_cfg, tmp_path, caplog):
    run = ["train.max_iters=4", "train.eval_interval=2", "train.eval_iters=2", "train.log_interval=2"]
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        finals = [train(tiny_cfg(*run, f"train.seed={seed}"), tmp_path)["final_val_loss"] for seed in (1, 2, 3)]
    superseded = tmp_path / "checkpoints" / "superseded"
    assert sorted(p.name for p in superseded.iterdir()) == ["001", "002"]
    assert f"to {superseded / '001'} and starting afresh" in caplog.text
    assert f"to {superseded / '002'} and starting afresh" in caplog.text
    for seed, folder in ((1, superseded / "001"), (2, superseded / "002"), (3, tmp_path)):
        ckpt = checkpoint_path(tmp_path, 4) if folder == tmp_path else folder / "iter_000004.ckpt"
        assert load_checkpoint(ckpt).config["train"]["seed"] == seed
        assert json.loads((folder / "metrics.json").read_text())["final_val_loss"] == finals[seed - 1]
        assert (folder / "model_final.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert [step for step, _ in scalars(folder)["train/loss"]] == [2, 4]
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 4)  # resume=auto takes the third run's


def files_in(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["train.max_time=0.001"], id="fresh-run-out-of-time-after-setup"),
        pytest.param(["resume={run}/checkpoints/iter_000005.ckpt", "optim.name=muon"], id="older-checkpoint-unfit"),
    ],
)
def test_a_run_that_fails_a_setup_check_leaves_the_earlier_runs_files_where_they_were(
    tiny_cfg, tmp_path, caplog, overrides
):
    run_dir = tmp_path / "run"
    run = ["train.max_iters=10", "train.ckpt_interval=5", "train.keep_last=0", "train.eval_interval=5"]
    train(tiny_cfg(*run, "train.eval_iters=2"), run_dir)
    before = files_in(run_dir)
    time.sleep(0.01)  # a file written again would have another modification time
    with pytest.raises(FluxtrainError):
        train(tiny_cfg(*run, *(o.format(run=run_dir) for o in overrides)), run_dir)
    assert files_in(run_dir) == before
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(tiny_cfg(*run, "resume=auto"), run_dir)
    assert f"resuming from {checkpoint_path(run_dir, 10)} at iteration 10" in caplog.text


def test_resume_from_a_folder_names_the_ways_to_continue_the_run_in_it(tiny_cfg, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    for it in (5, 10):  # resolving the name does not read the files
        checkpoint_path(run, it).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(run, it).write_bytes(b"a checkpoint")
    for named in (run, run / "checkpoints"):
        with pytest.raises(FluxtrainError) as info:
            train(tiny_cfg(f"resume={named}"), other)
        assert str(info.value) == (
            f"resume={named} is a folder, not a checkpoint file: to continue the run in it, use "
            f"hydra.run.dir={run} resume=auto, or resume={checkpoint_path(run, 10)} (its newest checkpoint)"
        )
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg(f"resume={other}"), tmp_path / "third")
    assert (
        str(info.value)
        == f"resume={other} is a folder with no checkpoint in {other / 'checkpoints'} (give a .ckpt file)"
    )


def test_resuming_with_another_optimizer_names_optim_name(tiny_cfg, tmp_path):
    run = ["train.eval_interval=2", "train.eval_iters=2", "train.log_interval=2"]
    train(tiny_cfg(*run, "train.max_iters=2"), tmp_path)
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg(*run, "train.max_iters=4", "optim.name=muon", "resume=auto"), tmp_path)
    message = str(info.value)
    assert message.startswith(f"{checkpoint_path(tmp_path, 2)}: optimizer state does not fit this optimizer (")
    assert message.endswith(
        "; the checkpoint was trained with optim.name=adam, this run asks for optim.name=muon "
        "(resume with optim.name=adam, or start a fresh run to change the optimizer)"
    )
    # Adam's state fits AdamW: that change is allowed.
    assert train(tiny_cfg(*run, "train.max_iters=4", "optim.name=adamw", "resume=auto"), tmp_path)["iters"] == 4


def test_the_largest_seed_trains_evaluates_samples_and_resumes(tiny_cfg, tmp_path):
    """Each evaluation and sample draws from a seed offset from train.seed: near 2**32 - 1 they wrap around."""
    run = ["train.seed=4294967295", "train.eval_interval=2", "train.eval_iters=2", "train.log_interval=2"]
    run += ["train.sample_interval=2", "train.sample_len=4", "train.ckpt_interval=2"]
    train(tiny_cfg(*run, "train.max_iters=2"), tmp_path)
    assert train(tiny_cfg(*run, "train.max_iters=4", "resume=auto"), tmp_path)["iters"] == 4


def test_keep_last_prunes_old_checkpoints_during_a_run(tiny_cfg, tmp_path):
    train(tiny_cfg("train.max_iters=12", "train.ckpt_interval=2", "train.keep_last=2"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000010.ckpt", "iter_000012.ckpt"]
    assert (tmp_path / "best.safetensors").is_file()


def test_a_session_looks_for_dead_writes_at_its_first_checkpoint_and_its_end_only(tiny_cfg, tmp_path, monkeypatch):
    """Looking lists the whole run folder, whose model files grow with every checkpoint (train.ckpt_interval=1 over
    thousands of iterations): only an earlier, killed process can have left a dead write."""
    (tmp_path / "checkpoints").mkdir()
    dead = tmp_path / "checkpoints" / ".iter_000001.ckpt.0a1b2c.tmp"
    dead.write_bytes(b"half a checkpoint")
    looks = []
    real_stale_temporary_files = resume_module.stale_temporary_files
    monkeypatch.setattr(
        resume_module, "stale_temporary_files", lambda *args: looks.append(1) or real_stale_temporary_files(*args)
    )
    train(tiny_cfg("train.max_iters=6", "train.ckpt_interval=1", "train.keep_last=0"), tmp_path)
    assert not dead.exists() and len(looks) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"iter_00000{i}.ckpt" for i in range(1, 7)]


def test_resume_refuses_a_different_model_shape_or_tokenizer_naming_the_keys(tiny_cfg, tmp_path):
    train(tiny_cfg("train.max_iters=2"), tmp_path)
    changed = ["resume=auto", "model.d_model=64", "model.n_layers=3", "train.max_iters=4", "optim.lr=1e-3"]
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg(*changed), tmp_path)
    message = str(info.value)
    assert "model.d_model=64 (checkpoint: 32)" in message and "model.n_layers=3 (checkpoint: 2)" in message
    assert "max_iters" not in message and "optim.lr" not in message and str(checkpoint_path(tmp_path, 2)) in message
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg("resume=auto", "tokenizer.kind=bpe", "tokenizer.vocab_size=300"), tmp_path)
    # tokenizer.vocab_size applies to BPE alone: the kind is the difference
    assert "tokenizer.kind=bpe (checkpoint: char)" in str(info.value) and "vocab_size" not in str(info.value)
    # Length, logging and dropout may change.
    metrics = train(tiny_cfg("resume=auto", "train.max_iters=4", "train.log_interval=1", "model.dropout=0.1"), tmp_path)
    assert metrics["iters"] == 4


def test_new_text_needs_the_runs_own_tokenizer_to_resume(tiny_cfg, tiny_text_file, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("train.max_iters=2"), run)
    new_text = tmp_path / "new.txt"
    new_text.write_text(tiny_text_file.read_text().replace("y", ""))  # a char vocabulary built from it lacks 'y'
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg("train.max_iters=4", "resume=auto", f"data.path={new_text}"), run)
    message = str(info.value)
    assert message.startswith(f"cannot resume from {checkpoint_path(run, 2)}: the tokenizer built now (char, vocab 38)")
    hint = f"to train on new text with the run's tokenizer, add tokenizer.path={run / 'tokenizer.json'}"
    assert message.endswith(f"differs from the checkpoint's (char, vocab 39); did data.* change?; {hint}")
    # As the message says: the run's own tokenizer file is not a changed setting, and the run continues.
    own = f"tokenizer.path={run / 'tokenizer.json'}"
    metrics = train(tiny_cfg("train.max_iters=4", "resume=auto", f"data.path={new_text}", own), run)
    assert metrics["iters"] == 4


def test_a_best_loss_of_another_folder_or_another_text_is_not_carried_over(tiny_cfg, tiny_text_file, tmp_path, caplog):
    first = train(tiny_cfg("train.max_iters=4"), tmp_path / "a")
    # Continued in another folder, which holds no best model file of its own: it evaluates and keeps its own best.
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        other = train(tiny_cfg("train.max_iters=4", f"resume={checkpoint_path(tmp_path / 'a', 4)}"), tmp_path / "b")
    assert "are not carried over: the checkpoint is another run folder's; this run keeps its own best" in caplog.text
    assert (tmp_path / "b" / "best.safetensors").is_file()
    assert other["best_val_loss"] == other["final_val_loss"] == pytest.approx(first["final_val_loss"], rel=1e-6)
    # On new text in its own folder, a finished run's results do not stand: they scored the old validation text.
    new_text = tmp_path / "new.txt"
    new_text.write_text("\n".join(reversed(tiny_text_file.read_text().splitlines())))  # the same characters
    own = f"tokenizer.path={tmp_path / 'a' / 'tokenizer.json'}"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        again = train(tiny_cfg("train.max_iters=4", "resume=auto", f"data.path={new_text}", own), tmp_path / "a")
    assert f"not carried over: the data changed (data.path={new_text} (checkpoint: {tiny_text_file}))" in caplog.text
    # The same file named another way is the same text: the finished run's results stand.
    caplog.clear()
    same = os.path.relpath(tiny_text_file)  # from the working folder, as the run reads it
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        stood = train(tiny_cfg("train.max_iters=4", "resume=auto", f"data.path={same}"), tmp_path / "b")
    assert stood == json.loads((tmp_path / "b" / "metrics.json").read_text()) and stood["iters"] == 4
    assert "not carried over" not in caplog.text and "its results in" in caplog.text
    assert again["final_val_loss"] != first["final_val_loss"]
    assert again["best_val_loss"] == again["final_val_loss"]
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert saved["final_val_loss"] == again["final_val_loss"]


def signal_during_evaluation(monkeypatch, call: int, signum: int) -> None:
    """Send this process `signum` during the `call`-th evaluation (counted from 1)."""
    real_estimate = train_module.estimate_loss
    calls = 0

    def estimate_loss(*args):
        nonlocal calls
        calls += 1
        if calls == call:
            os.kill(os.getpid(), signum)
        return real_estimate(*args)

    monkeypatch.setattr(train_module, "estimate_loss", estimate_loss)


def test_a_signal_during_the_final_evaluation_stops_the_run_once_its_results_are_written(
    tiny_cfg, tmp_path, monkeypatch
):
    """It used to be acknowledged and then ignored: a sweep ran on, and a preempted job was killed in its next run."""
    signal_during_evaluation(monkeypatch, 3, signal.SIGTERM)  # evaluations at 5, 10 and then the final one at 12
    cfg = tiny_cfg("train.max_iters=12", "train.eval_interval=5", "train.ckpt_interval=5")
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, tmp_path)
    assert info.value.exit_code == 128 + signal.SIGTERM and str(info.value) == "stopped by SIGTERM as the run finished"
    assert json.loads((tmp_path / "metrics.json").read_text())["iters"] == 12
    assert (tmp_path / "model_final.safetensors").exists() and checkpoint_path(tmp_path, 12).exists()


def test_a_run_stopped_at_its_last_iteration_and_resumed_logs_nothing_twice(tiny_cfg, tmp_path, monkeypatch):
    """Ctrl-C during the evaluation at max_iters: the checkpoint there follows the evaluation, and the resumed run,
    with nothing to train, reports that evaluation instead of logging another at the same step."""
    signal_during_evaluation(monkeypatch, 2, signal.SIGINT)  # the evaluation at iteration 10 = max_iters
    settings = ("train.max_iters=10", "train.eval_interval=5", "train.ckpt_interval=0")
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg(*settings), tmp_path)
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 10) and not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    logged = scalars(tmp_path)
    (tmp_path / ".metrics.json.1a2b3c.tmp").write_text('{"iters": ')  # as a process killed while writing it left it
    metrics = train(tiny_cfg(*settings, "resume=auto"), tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))  # the session that writes the results removes it; no checkpoint would
    assert scalars(tmp_path) == logged  # no step twice
    assert metrics["final_val_loss"] == pytest.approx(logged["val/loss"][-1][1])  # the evaluation at iteration 10
    assert json.loads((tmp_path / "metrics.json").read_text())["iters"] == 10


def test_auto_resume_from_a_damaged_newest_checkpoint_names_the_one_before(tiny_cfg, tmp_path):
    older, newest = checkpoint_path(tmp_path, 5), checkpoint_path(tmp_path, 10)
    newest.parent.mkdir()
    older.write_bytes(b"an older checkpoint")
    newest.write_bytes(b"")
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg("resume=auto"), tmp_path)
    hint = f"to continue from the checkpoint before it, use resume={older}"
    assert str(info.value) == f"checkpoint {newest} is empty; {hint}"


def test_a_checkpoint_whose_name_and_progress_disagree_is_refused(tiny_cfg, tmp_path):
    """resume=auto, pruning and the moving aside of later files go by the names: a checkpoint at iteration 10 under
    the name of iteration 20 would have the run set aside the very file it resumes from."""
    train(tiny_cfg("train.max_iters=10", "train.ckpt_interval=5", "train.keep_last=0"), tmp_path)
    renamed = checkpoint_path(tmp_path, 20)
    checkpoint_path(tmp_path, 10).rename(renamed)
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg("train.max_iters=30", "resume=auto"), tmp_path)
    assert str(info.value).startswith(f"{renamed} is damaged: its name says iteration 20, its progress 10; ")
    assert "to continue from the checkpoint before it, use resume=" in str(info.value)
    assert renamed.exists()


def test_time_budget_carries_over_on_resume(tiny_cfg, tmp_path, monkeypatch, caplog):
    interrupt_at(monkeypatch, 3)
    t0 = time.perf_counter()
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg("train.max_time=1000"), tmp_path)
    spent = load_checkpoint(checkpoint_path(tmp_path, 3)).progress.train_time
    assert 0 < spent < time.perf_counter() - t0
    monkeypatch.undo()

    # Pretend the loop had already used 2000 s: a 1000 s budget is then spent, so the resumed run ends at once.
    real_restore = train_module.restore

    def restore(*args):
        progress = real_restore(*args)
        progress.train_time += 2000
        return progress

    monkeypatch.setattr(train_module, "restore", restore)
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        metrics = train(tiny_cfg("train.max_time=1000", "resume=auto"), tmp_path)
    assert metrics["iters"] == 3
    assert re.search(r"s to train \(it trained 20\d\d\.\ds before the checkpoint\)", caplog.text)
    assert "of training use up the" in caplog.text and "evaluating without training" in caplog.text


def test_injected_inf_loss_stops_naming_the_iteration_and_last_good_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    poison_training_loss(monkeypatch, 12, float("inf"))
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg("train.ckpt_interval=5", "train.keep_last=0", "train.eval_interval=100"), tmp_path)
    good = checkpoint_path(tmp_path, 10)
    assert str(info.value).startswith("loss became inf at iteration 12;")
    assert f"the last good checkpoint is {good}" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000005.ckpt", "iter_000010.ckpt"]
    assert not (tmp_path / "model_final.safetensors").exists()
    assert load_checkpoint(good).progress.iteration == 10


def test_a_non_finite_evaluation_stops_the_run_before_anything_is_saved(tiny_cfg, tmp_path, monkeypatch):
    """Weights can stay finite while the losses they give overflow: the evaluation is checked like the steps."""
    real_estimate = train_module.estimate_loss
    evaluations = []

    def estimate_loss(*args):
        losses = real_estimate(*args)
        evaluations.append(losses)
        return {**losses, "val": float("nan")} if len(evaluations) == 2 else losses

    monkeypatch.setattr(train_module, "estimate_loss", estimate_loss)
    cfg = tiny_cfg("train.eval_interval=5", "train.ckpt_interval=5", "train.keep_last=0", "train.max_iters=20")
    with pytest.raises(FluxtrainError) as info:
        train(cfg, tmp_path)
    good = checkpoint_path(tmp_path, 5)
    assert str(info.value).startswith("the val loss became nan when evaluated at iteration 10;")
    assert f"the last good checkpoint is {good}" in str(info.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["iter_000005.ckpt"]
    assert not (tmp_path / "model_final.safetensors").exists() and not (tmp_path / "metrics.json").exists()
    # A step so large that the weights stay finite (about 1e30) but every loss overflows: no results, no files.
    monkeypatch.undo()
    run = tmp_path / "huge"
    cfg = tiny_cfg("optim.lr=1e30", "optim.warmup_iters=0", "train.max_iters=1")
    with pytest.raises(FluxtrainError, match=r"^the (train|val) loss became nan when evaluated at iteration 1; "):
        train(cfg, run)
    assert not list(run.glob("*.safetensors")) and not (run / "metrics.json").exists()
    assert not (run / "checkpoints").exists()


def test_huge_learning_rate_stops_without_saving_non_finite_weights(tiny_cfg, tmp_path):
    # The warm-up starts at lr 0, so the first checkpoints hold good weights before the run blows up.
    cfg = tiny_cfg("optim.lr=1e6", "optim.warmup_iters=10", "optim.grad_clip=0", "train.ckpt_interval=1")
    with pytest.raises(FluxtrainError) as info:
        train(cfg, tmp_path)
    message = str(info.value)
    match = re.match(r"(loss became (nan|inf)|the weights became NaN or infinite) at iteration (\d+);", message)
    assert match, message
    last_good = find_latest(tmp_path)
    assert last_good is not None and f"the last good checkpoint is {last_good}" in message
    assert int(last_good.stem[5:]) < int(match.group(3))
    for path in (tmp_path / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path).model.values()), path


def sigterm_on(cmd: list[str], env: dict[str, str], marker: str) -> tuple[int, str]:
    """Run `cmd`, send it SIGTERM once a line of its output holds `marker` (or after 240 s); its exit status and
    whole output."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if marker in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        lines += proc.stdout.readlines()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, "".join(lines)


@pytest.mark.slow
def test_sigterm_to_a_training_process_writes_a_checkpoint_that_resumes(tiny_text_file, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith(("train.max_iters", "train.log_interval"))]
    overrides += [f"data.path={tiny_text_file}", f"data.cache_dir={tmp_path / 'cache'}", "model.dropout=0.1"]
    overrides += ["train.max_iters=100000", "train.log_interval=5"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "fluxtrain", *overrides, f"hydra.run.dir={run_dir}"]
    returncode, output = sigterm_on(cmd, env, "iter      5/100000")
    assert returncode == 128 + signal.SIGTERM, output
    stopped = re.search(r"stopped by SIGTERM after iteration (\d+); checkpoint: (\S+)", output)
    assert stopped, output
    iteration, ckpt = int(stopped.group(1)), Path(stopped.group(2))
    assert iteration >= 5 and ckpt == checkpoint_path(run_dir, iteration) and "Traceback" not in output
    assert load_checkpoint(ckpt).progress.iteration == iteration

    # The printed command resumes the run (here with a shorter max_iters, so that it ends soon).
    resume_cmd = shlex.split(re.search(r"resume with: (.+)", output).group(1))
    assert resume_cmd[:3] == ["python", "-m", "fluxtrain"] and "resume=auto" in resume_cmd
    resume_cmd = [sys.executable, *resume_cmd[1:]]
    resume_cmd = [w if not w.startswith("train.max_iters=") else f"train.max_iters={iteration + 3}" for w in resume_cmd]
    result = subprocess.run(resume_cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from {ckpt} at iteration {iteration}" in result.stdout + result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["iters"] == iteration + 3
    steps = [s for s, _ in scalars(run_dir)["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == iteration + 3


@pytest.mark.slow
def test_sigterm_during_setup_leaves_an_earlier_runs_folder_as_it_was(tiny_text_file, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    earlier = {".hydra/config.yaml": "model:\n  n_layers: 6\n", ".hydra/overrides.yaml": "- model.n_layers=6\n"}
    earlier["metrics.json"] = '{"best_val_loss": 1.9, "iters": 300}\n'
    for name, text in earlier.items():
        (run_dir / name).write_text(text)
    overrides = [f"data.path={tiny_text_file}", f"data.cache_dir={tmp_path / 'cache'}", "train.compile=true"]
    cmd = [sys.executable, "-m", "fluxtrain", *TINY_OVERRIDES, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    returncode, output = sigterm_on(cmd, env, "model: ")  # the model is built: compiling it (seconds) is to come
    assert returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM before training began" in output and "Traceback" not in output
    assert "torch.compile failed" not in output and "iter " not in output
    for name, text in earlier.items():
        assert (run_dir / name).read_text() == text, name
    assert not (run_dir / "checkpoints").exists() and not list(run_dir.glob("events.*"))


def test_a_run_stopped_in_python_is_told_how_to_continue_there(tiny_cfg, tmp_path, monkeypatch, caplog):
    interrupt_at(monkeypatch, 2)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"), pytest.raises(TrainingInterrupted):
        train(tiny_cfg("train.max_iters=4"), tmp_path / "run")
    hint = f"resume with: train(compose([<the settings of the run>, 'resume=auto']), '{tmp_path / 'run'}') from Python"
    assert hint in caplog.text


def test_the_resume_command_relaunches_as_many_processes(tmp_path):
    run = tmp_path / "run"
    assert resume_command(run) == f"python -m fluxtrain hydra.run.dir={run.resolve()} resume=auto"
    one_node = resume_command(run, world_size=4, local_world_size=4)
    assert (
        one_node
        == f"torchrun --nproc_per_node=4 --standalone -m fluxtrain hydra.run.dir={run.resolve()} " + "resume=auto"
    )
    two_nodes = resume_command(run, world_size=8, local_world_size=4)
    assert two_nodes.startswith("torchrun --nproc_per_node=4 --nnodes=2 -m fluxtrain ")
    assert two_nodes.endswith("resume=auto  (on every node, with the rendezvous options of the first launch)")


def test_a_run_refused_at_setup_leaves_the_folders_hydra_config_as_it_was(tiny_cfg, tiny_text_file, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_cfg("train.max_iters=10", "train.eval_interval=5", "train.eval_iters=2"), run_dir)
    hydra_dir = run_dir / ".hydra"  # as the earlier run's command line left it
    hydra_dir.mkdir()
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (hydra_dir / name).write_text(f"the earlier run's {name}\n")
    hydra_files = {p.name: p.read_bytes() for p in hydra_dir.iterdir()}

    args = [*TINY_OVERRIDES, f"data.path={tiny_text_file}", f"data.cache_dir={tmp_path / 'cache'}"]
    refused = run_fluxtrain(*args, "model.n_layers=3", "optim.lr=0.01", "resume=auto", f"hydra.run.dir={run_dir}")
    assert refused.returncode == 1 and "model.n_layers=3 (checkpoint: 2)" in refused.stderr + refused.stdout
    assert {p.name: p.read_bytes() for p in hydra_dir.iterdir()} == hydra_files  # what fluxtrain.runs reads


def test_a_run_stopped_after_it_claimed_its_folder_keeps_its_own_hydra_config(tiny_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(tiny_cfg("train.max_iters=10", "train.eval_interval=5", "train.eval_iters=2"), run_dir)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the earlier run's\n")
    remember_run_configs(run_dir)
    (run_dir / ".hydra" / "config.yaml").write_text("this run's\n")  # as Hydra saves it before the run starts
    interrupt_at(monkeypatch, 12)
    with pytest.raises(TrainingInterrupted):
        run_task(tiny_cfg("train.max_iters=20", "train.eval_interval=5", "train.eval_iters=2", "resume=auto"), run_dir)
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "this run's\n"


PATHS = [
    "/tmp/runs/lr=1e-3,bs=8",
    "/tmp/sp ace/run 2/checkpoints/iter_000200.ckpt",
    '/tmp/it\'s/a "quoted" [run]{1}:(2)',
    "/tmp/back\\slash\\",
    "/tmp/back\\\\'quote\\\"",
    "/tmp/${now:%H}/a\\${b}",
    "/tmp/café/#1 & ~x; $HOME",
    "1e-3",
    "null",
]


def hydra_value(word: str, key: str):
    """What Hydra and OmegaConf make of `key=value` as the shell gives it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    (override,) = OverridesParser.create().parse_overrides([word])
    assert override.key_or_group == key
    return OmegaConf.create({"value": override.value()}).value


@pytest.mark.parametrize("path", PATHS)
def test_paths_in_commands_and_hints_reach_hydra_as_they_are(path):
    words = shlex.split(path_override("resume", path))
    assert len(words) == 1 and hydra_value(words[0], "resume") == path

    *_, run_dir_word, resume = shlex.split(resume_command(Path(path)))
    assert resume == "resume=auto" and hydra_value(run_dir_word, "hydra.run.dir") == str(Path(path).resolve())
    hint = re.search(r"continue with (.+)\); try", str(divergence_error("loss became nan", 7, Path(path), 0.1)))[1]
    (word,) = shlex.split(hint)
    assert hydra_value(word, "resume") == path


def test_plain_paths_are_printed_as_they_are(tmp_path):
    assert path_override("resume", "/tmp/a-b/c_d/iter_000010.ckpt") == "resume=/tmp/a-b/c_d/iter_000010.ckpt"
    assert path_override("resume", "/tmp/a,b") == "'resume=\"/tmp/a,b\"'"


def test_the_resume_command_keeps_the_config_dir_and_config_name(tiny_text_file, tmp_path):
    from hydra.conf import ConfigSourceInfo
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from .conftest import compose_config

    conf = tmp_path / "my conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "tiny.yaml").write_text("d_model: 32\nn_heads: 2\nn_layers: 1\nff_dim: 64\nseq_len: 16\n")
    overrides = ["model=small", f"data.path={tiny_text_file}", "train.max_iters=3"]

    def command(config_name: str) -> str:
        """The resume command of a run launched with `--config-dir <conf> --config-name <config_name>`."""
        cfg = compose_config(overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.RUN
            source = ConfigSourceInfo(path=str(conf), schema="file", provider="command-line")
            cfg.hydra.runtime.config_sources.append(source)
            cfg.hydra.job.config_name = config_name
            cfg.hydra.overrides.task = ["model=tiny", *overrides[1:]]
        HydraConfig.instance().set_config(cfg)
        try:
            return resume_command(tmp_path / "run")
        finally:
            HydraConfig.instance().cfg = None

    words, lr_find_words = shlex.split(command("config")), shlex.split(command("lr_find"))
    assert words[:5] == ["python", "-m", "fluxtrain", "--config-dir", str(conf)] and words[-1] == "resume=auto"
    assert lr_find_words[:7] == [*words[:5], "--config-name", "lr_find"]
    # The command composes: Hydra finds model/tiny in the config folder.
    composed = run_fluxtrain(*words[3:], "--cfg", "job")
    assert composed.returncode == 0, composed.stderr
    assert "n_layers: 1" in composed.stdout and f"path: {tiny_text_file}" in composed.stdout


def test_a_full_disk_stops_naming_the_file_and_the_checkpoint_to_resume_from(tiny_cfg, tmp_path, monkeypatch):
    import errno

    run_dir = tmp_path / "run"
    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".iter_000020.ckpt."):
            real_write_bytes(self, data[:100])  # a part, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    cfg = tiny_cfg("train.ckpt_interval=10", "train.keep_last=0")
    with pytest.raises(FluxtrainError) as info:
        run_task(cfg, run_dir)
    good = checkpoint_path(run_dir, 10)
    assert str(info.value) == (
        f"cannot write {checkpoint_path(run_dir, 20)}: No space left on device; stopped: the last good checkpoint is "
        f"{good} (make room or fix the folder, then resume with: python -m fluxtrain hydra.run.dir={run_dir} "
        "resume=auto)"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [good.name]  # no partial file
    monkeypatch.undo()
    assert train(tiny_cfg("train.ckpt_interval=10", "resume=auto"), run_dir)["iters"] == 30


def test_a_model_file_that_cannot_be_written_is_named(tiny_cfg, tmp_path, monkeypatch):
    import errno

    real_write_bytes = Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".best.safetensors."):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(FluxtrainError) as info:
        run_task(tiny_cfg(), tmp_path)
    assert str(info.value) == (
        f"cannot write {tmp_path / 'best.safetensors'}: Read-only file system; stopped: no checkpoint was written "
        "before it"
    )


def test_a_resumed_runs_wall_time_counts_its_earlier_sessions(tiny_cfg, tmp_path):
    run = ["train.max_iters=10", "train.eval_interval=5", "train.eval_iters=2"]
    first = train(tiny_cfg(*run), tmp_path)
    saved = load_checkpoint(find_latest(tmp_path)).progress.wall_time
    assert 0 < saved <= first["wall_time_sec"]
    again = train(tiny_cfg(*run, "resume=auto"), tmp_path)  # nothing left to train: it evaluates
    assert again["iters"] == 10 and again["wall_time_sec"] > saved
