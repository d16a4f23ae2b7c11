"""What a run does to its folder: the results a resume sets aside, another run's checkpoint, dead temporary files."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch

import fluxtrain.train as train_module
from fluxtrain.errors import FluxtrainError
from fluxtrain.interrupt import TrainingInterrupted
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import read_model_file, save_model_file
from fluxtrain.resume import checkpoint_path, list_checkpoints, prune
from fluxtrain.runs import RUN_OUTPUTS, find_runs, read_metadata, results_after, runs_table
from fluxtrain.tokenizer import CharTokenizer
from fluxtrain.train import train

RUN = ["train.max_iters=20", "train.eval_interval=5", "train.eval_iters=2", "train.ckpt_interval=10"]
RUN += ["train.keep_last=0", "train.log_interval=5"]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("events."))


def interrupt_at(monkeypatch, iteration: int) -> None:
    """SIGTERM to this process while it trains iteration `iteration` (counted from 1): a checkpoint, then a stop."""
    real_lr_at = train_module.lr_at

    def lr_at(it, progress, cfg):
        if it == iteration - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr_at(it, progress, cfg)

    monkeypatch.setattr(train_module, "lr_at", lr_at)


def test_resuming_from_an_older_checkpoint_sets_aside_every_result_written_after_it(tiny_cfg, tmp_path, caplog):
    train(tiny_cfg(*RUN), tmp_path)
    best_at = int(read_metadata(tmp_path / "best.safetensors")["iteration"])
    assert best_at > 10  # the loss still falls after iteration 10: the best model is one of the future given up
    abandoned = read_model_file(tmp_path / "best.safetensors")[1]
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        metrics = train(tiny_cfg(*RUN, "optim.lr=1e-5", f"resume={checkpoint_path(tmp_path, 10)}"), tmp_path)
    superseded = tmp_path / "checkpoints" / "superseded" / "001"
    assert names(superseded) == [
        "best.safetensors",
        "iter_000020.ckpt",
        "metrics.json",
        "model_final.safetensors",
        "model_iter_000020.safetensors",
    ]
    assert (
        "resuming at iteration 10: moved 1 later checkpoint(s) and model_final.safetensors, metrics.json, "
        f"model_iter_000020.safetensors, best.safetensors to {superseded}"
    ) in caplog.text
    assert json.loads((superseded / "metrics.json").read_text())["best_val_loss"] != metrics["best_val_loss"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics  # the resumed run's own results
    # What the folder serves now comes from the resumed run (lr 1e-5 barely moves it), not from the future given up.
    best = tmp_path / "best.safetensors"
    if best.is_file():
        assert int(read_metadata(best)["iteration"]) > 10
        assert any(not torch.equal(v, abandoned[k]) for k, v in read_model_file(best)[1].items())
    assert (tmp_path / "model_iter_000010.safetensors").is_file()  # saved before the resume point: kept


def test_a_best_model_saved_at_or_before_the_resume_point_is_kept(tmp_path):
    ckpt = checkpoint_path(tmp_path, 10)
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"a checkpoint")
    model, tokenizer = (
        GPT(ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, seq_len=8), 4),
        CharTokenizer(list("abcd")),
    )
    best = tmp_path / "best.safetensors"
    for name in ("model_iter_000005.safetensors", "model_iter_000010.safetensors", "model_iter_000015.safetensors"):
        save_model_file(tmp_path / name, model, tokenizer)
    for at, later in ((5, False), (10, False), (15, True)):
        save_model_file(best, model, tokenizer, {"iteration": str(at)})
        assert (best in results_after(tmp_path, 10, ckpt)) == later
    assert results_after(tmp_path, 10, ckpt) == [tmp_path / "model_iter_000015.safetensors", best]
    # Saved by an earlier version, without a record: later when it is newer than the checkpoint.
    save_model_file(best, model, tokenizer)
    os.utime(ckpt, (best.stat().st_mtime - 5,) * 2)
    assert best in results_after(tmp_path, 10, ckpt)
    os.utime(ckpt, (best.stat().st_mtime + 5,) * 2)
    assert best not in results_after(tmp_path, 10, ckpt)


def test_resuming_another_runs_checkpoint_sets_this_folders_run_aside(tiny_cfg, tmp_path, caplog):
    other, run = tmp_path / "other", tmp_path / "run"
    train(tiny_cfg("train.max_iters=10", "train.ckpt_interval=5", "model.n_layers=1"), other)
    train(tiny_cfg("train.max_iters=10", "train.ckpt_interval=5", "train.keep_last=0"), run)
    resume = checkpoint_path(other, 10)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg("train.max_iters=20", "train.ckpt_interval=5", "train.keep_last=1", f"resume={resume}",
                       "model.n_layers=1"), run)  # fmt: skip
    superseded = run / "checkpoints" / "superseded" / "001"
    assert (
        f"{run} holds an earlier run: moved its 2 checkpoint(s) and 7 result, tokenizer and event file(s) to "
        f"{superseded} and continuing {resume} in it"
    ) in caplog.text
    # The folder's own run is kept whole, apart from the one that continues the other run's checkpoint.
    assert names(superseded) == [
        "best.safetensors",
        "iter_000005.ckpt",
        "iter_000010.ckpt",
        "metrics.json",
        "model_final.safetensors",
        "model_iter_000005.safetensors",
        "model_iter_000010.safetensors",
        "tokenizer.json",
    ]
    assert len(list(superseded.glob("events.*"))) == 1
    assert [p.name for _, p in list_checkpoints(run)] == ["iter_000020.ckpt"]
    assert sorted(p.name for p in run.glob("model_iter_*")) == ["model_iter_000015.safetensors",
                                                                "model_iter_000020.safetensors"]  # fmt: skip
    assert len(list(run.glob("events.*"))) == 1


def test_a_stopped_resumed_session_reads_as_unfinished_not_as_the_earlier_sessions_result(
    tiny_cfg, tmp_path, monkeypatch
):
    train(tiny_cfg(*RUN), tmp_path)
    interrupt_at(monkeypatch, 25)
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg(*RUN, "train.max_iters=40", "resume=auto"), tmp_path)
    # The first session's results describe the checkpoint the second went on from: kept, and read as stale.
    assert json.loads((tmp_path / "metrics.json").read_text())["iters"] == 20
    assert not (tmp_path / "checkpoints" / "superseded").exists()
    [run] = find_runs(tmp_path)
    assert run.metrics is None and run.unfinished_at == 25
    assert runs_table([run], keys=())[0]["status"] == "unfinished (iter 25)"


def test_the_next_checkpoint_removes_dead_temporary_files_of_the_runs_files_only(tiny_cfg, tmp_path):
    dead = [".best.safetensors.a4273c3d3757.tmp", ".model_iter_000028.safetensors.ec54cad1997e.tmp"]
    dead += [".model_final.safetensors.0123456789ab.tmp", ".metrics.json.abcdef012345.tmp"]
    dead += [".tokenizer.json.00112233aabb.tmp", "checkpoints/.iter_000030.ckpt.ffeeddccbbaa.tmp"]
    kept = [".notes.txt.a4273c3d3757.tmp", ".best.safetensors.tmp", ".best.safetensors.a427xyz.tmp"]
    kept += ["best.safetensors.a4273c3d3757.tmp", ".model_iter_x.bin.a4273c3d3757.tmp", "checkpoints/notes.tmp"]
    (tmp_path / "checkpoints").mkdir()
    for name in dead + kept:
        (tmp_path / name).write_bytes(b"partial")
    assert sorted(prune(tmp_path, 0, RUN_OUTPUTS)) == sorted(tmp_path / name for name in dead)
    assert all((tmp_path / name).is_file() for name in kept)
    for name in dead:
        (tmp_path / name).write_bytes(b"partial")
    train(tiny_cfg("train.max_iters=2"), tmp_path)  # its one checkpoint, at the end
    assert not any((tmp_path / name).exists() for name in dead)
    assert all((tmp_path / name).is_file() for name in kept)


@pytest.mark.parametrize("resume", ["resume=auto", "resume=null"])
def test_a_file_named_checkpoints_in_the_run_folder_is_an_error_before_any_work(tiny_cfg, tmp_path, resume):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("my notes")
    with pytest.raises(FluxtrainError) as info:
        train(tiny_cfg(resume), run)
    assert str(info.value) == (
        f"{run / 'checkpoints'} is a file, not a folder: a run keeps its checkpoints there "
        "(move the file away, or choose another hydra.run.dir)"
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # nothing written, nothing moved
    assert not (tmp_path / "cache").exists()  # refused before the data was read
    assert (run / "checkpoints").read_text() == "my notes"


def test_a_file_named_checkpoints_beside_finished_results_does_not_stop_the_listing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"iters": 5, "best_val_loss": 2.5}))
    (run / "checkpoints").write_text("my notes")
    [found] = find_runs(tmp_path)
    assert found.metrics["best_val_loss"] == 2.5 and found.unfinished_at is None


def test_the_tokenizer_file_a_run_is_given_in_its_folder_is_neither_moved_nor_rewritten(tiny_cfg, tmp_path, caplog):
    first, run = tmp_path / "first", tmp_path / "project"
    train(tiny_cfg("train.max_iters=2", "train.eval_iters=1"), first)
    run.mkdir()
    given = run / "tokenizer.json"
    given.write_text((first / "tokenizer.json").read_text() + "\n")  # the user's own copy, byte for byte
    (run / "metrics.json").write_text((first / "metrics.json").read_text())  # an earlier run's result
    content = given.read_bytes()
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg("train.max_iters=2", "train.eval_iters=1", f"tokenizer.path={given}"), run)
    assert given.read_bytes() == content
    superseded = run / "checkpoints" / "superseded" / "001"
    assert names(superseded) == ["metrics.json"]
    assert f"{run} holds an earlier run's files: moved metrics.json to {superseded} and starting afresh" in caplog.text


def test_hydra_mode_multirun_writes_into_the_sweep_folder_so_that_is_the_one_checked():
    from fluxtrain.run_folder import given_output_dir

    args = ["hydra.mode=MULTIRUN", "hydra.sweep.dir=sweep", "hydra.run.dir=run"]
    assert given_output_dir(args) == ("hydra.sweep.dir", "sweep")
    assert given_output_dir(args[1:]) == ("hydra.run.dir", "run")
    assert given_output_dir(["-m", *args[1:]]) == ("hydra.sweep.dir", "sweep")


def test_a_second_run_in_a_folder_that_a_run_is_using_is_refused(tiny_cfg, tmp_path):
    """Two runs in one folder at once moved and pruned each other's files; the folder's lock refuses the second."""
    from fluxtrain.run_folder import FolderInUse, lock_run_dir

    run = tmp_path / "run"
    run.mkdir()
    held = lock_run_dir(run)  # as the first run holds it while it trains
    try:
        for extra in ((), ("resume=auto",)):
            with pytest.raises(FolderInUse, match=f"^{run} is in use by another fluxtrain run; wait for it to end"):
                train(tiny_cfg(*RUN, *extra), run)
        assert list(run.iterdir()) == []
    finally:
        os.close(held)
    assert train(tiny_cfg(*RUN), run)["iters"] == 20  # free again once the first run's process lets go
    os.close(lock_run_dir(run))  # and the run let go of it when it ended


@pytest.mark.parametrize(
    ("make", "found", "kind"),
    [
        (lambda run: (run / "train.log").mkdir(), "folder", "file"),
        (lambda run: os.mkfifo(run / "train.log"), "file of another kind (a pipe, a socket)", "file"),
        (lambda run: (run / ".hydra").write_text(""), "file", "folder"),
        (lambda run: (run / ".hydra" / "overrides.yaml").mkdir(parents=True), "folder", "file"),
    ],
    ids=["log-folder", "log-fifo", "hydra-file", "overrides-folder"],
)
def test_what_hydra_would_meet_in_place_of_its_files_is_one_line(tmp_path, make, found, kind):
    """Hydra would end with a traceback, or wait forever opening a named pipe as its log."""
    from fluxtrain.run_folder import check_output_dir

    run = tmp_path / "run"
    run.mkdir()
    make(run)
    with pytest.raises(FluxtrainError) as info:
        check_output_dir([f"hydra.run.dir={run}"])
    assert str(info.value).startswith(f"hydra.run.dir={run} holds a {found} at {run}/")
    assert str(info.value).endswith(f"where Hydra writes a {kind}: remove it, or give the run another folder")


def test_a_sweep_s_job_folders_are_checked_too_a_dangling_link_is_not_and_the_log_follows_the_job_name(tmp_path):
    from fluxtrain.run_folder import check_output_dir

    sweep = tmp_path / "sweep"
    (sweep / "1" / "train.log").mkdir(parents=True)
    with pytest.raises(FluxtrainError) as info:
        check_output_dir(["-m", f"hydra.sweep.dir={sweep}", "optim.lr=1e-3,3e-3"])
    assert str(info.value).startswith(f"hydra.sweep.dir={sweep} holds a folder at {sweep / '1' / 'train.log'}, ")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").symlink_to(run / "elsewhere.log")  # Hydra writes the link's target
    (run / "x.log").mkdir()
    check_output_dir([f"hydra.run.dir={run}"])
    with pytest.raises(FluxtrainError, match="holds a folder at .*/x.log, where Hydra writes a file"):
        check_output_dir([f"hydra.run.dir={run}", "hydra.job.name=x"])
