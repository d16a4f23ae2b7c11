"""Training behaviour: the loss falls by a stated amount, seeded runs repeat exactly, the CLI writes a run folder."""

import os
import subprocess
import sys

import pytest
import torch

import fluxtrain.train as train_module
from fluxtrain import load_model
from fluxtrain.errors import FluxtrainError
from fluxtrain.model_file import read_model_file
from fluxtrain.train import train

from .conftest import REPO_ROOT, TINY_OVERRIDES, poison_training_loss


def test_every_model_file_and_checkpoint_of_a_run_says_its_iteration(tiny_cfg, tmp_path):
    from fluxtrain.runs import read_metadata, saved_iteration

    train(tiny_cfg("train.max_iters=4", "train.ckpt_interval=2", "train.eval_interval=2"), tmp_path)
    saved = {p.name: read_metadata(p).get("iteration") for p in sorted(tmp_path.glob("*.safetensors"))}
    assert saved["model_iter_000002.safetensors"] == "2" and saved["model_iter_000004.safetensors"] == "4"
    assert saved["model_final.safetensors"] == "4" and saved["best.safetensors"] in ("2", "4")
    assert saved_iteration(tmp_path / "checkpoints" / "iter_000002.ckpt") == 2  # from its progress
    assert saved_iteration(tmp_path / "model_final.safetensors") == 4


def test_train_refuses_a_config_of_another_task(tiny_cfg, tmp_path):
    with pytest.raises(
        FluxtrainError, match=r"^task=lr_find: train\(\) trains; fluxtrain.lr_find.lr_find\(cfg, run_dir\)"
    ):
        train(tiny_cfg("task=lr_find"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_model_settings_may_name_other_settings(tiny_cfg, tmp_path):
    train(tiny_cfg("model.ff_dim=${model.d_model}", "train.max_iters=2"), tmp_path)
    model, _ = load_model(tmp_path / "model_final.safetensors")
    assert model.cfg.ff_dim == model.cfg.d_model


def test_same_seed_gives_same_losses_and_weights(tiny_cfg, tmp_path):
    a = train(tiny_cfg("model.dropout=0.1"), tmp_path / "a")
    b = train(tiny_cfg("model.dropout=0.1"), tmp_path / "b")
    c = train(tiny_cfg("model.dropout=0.1", "train.seed=7"), tmp_path / "c")
    assert a["final_train_loss"] == b["final_train_loss"] and a["final_val_loss"] == b["final_val_loss"]
    wa, wb = (load_model(tmp_path / r / "model_final.safetensors")[0].state_dict() for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert c["final_train_loss"] != a["final_train_loss"]


def test_cli_run_folder(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    corpus = tmp_path / "corpus.txt"
    from .conftest import make_text

    corpus.write_text(make_text())
    overrides = [*TINY_OVERRIDES, "train.sample_interval=15", "train.ckpt_interval=15", "train.sample_len=20"]
    overrides.append(f"data.cache_dir={tmp_path}/cache")
    subprocess.run(
        [sys.executable, "-m", "fluxtrain", *overrides, f"data.path={corpus}", f"hydra.run.dir={run}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    names = {p.name for p in run.iterdir()}
    expected = {".hydra", "train.log", "tokenizer.json", "model_final.safetensors", "best.safetensors"}
    assert expected <= names
    assert {"model_iter_000015.safetensors", "model_iter_000030.safetensors"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    log = (run / "train.log").read_text()
    assert "iter     10/30 | loss" in log and "tok/s" in log and "sample at iteration 15" in log
    assert "parameters" in log


def test_the_best_model_is_the_one_with_the_lowest_val_loss_not_the_last(tiny_cfg, tmp_path, monkeypatch):
    """Scripted val losses (the evaluation itself is tested elsewhere): the second of three evaluations is the best."""
    scripted = iter([3.0, 2.0, 2.5])
    monkeypatch.setattr(train_module, "estimate_loss", lambda *args: {"val": next(scripted)})
    cfg = tiny_cfg("train.max_iters=30", "train.eval_interval=10", "train.ckpt_interval=10", "train.keep_last=0")
    metrics = train(cfg, tmp_path)
    assert metrics["best_val_loss"] == 2.0 and metrics["final_val_loss"] == 2.5
    best = read_model_file(tmp_path / "best.safetensors")[1]
    at_20 = read_model_file(tmp_path / "model_iter_000020.safetensors")[1]
    final = read_model_file(tmp_path / "model_final.safetensors")[1]
    assert all(torch.equal(best[k], at_20[k]) for k in best)
    assert not all(torch.equal(best[k], final[k]) for k in best)
    with pytest.raises(StopIteration):
        next(scripted)  # exactly three evaluations: at 10, 20 and 30


def test_train_from_python_checks_the_config_as_the_command_line_does(tiny_cfg, tmp_path):
    """A config composed or edited in Python gets the command line's checks, and a refused one leaves no folder."""
    from omegaconf import OmegaConf

    from fluxtrain.errors import FluxtrainError

    cases = [
        ({"resume": ""}, "resume='' is empty"),
        ({"optim.lr": "${optim.nope}"}, "optim.lr: "),
        ({"train.max_time": float("inf")}, "train.max_time"),
        ({"model.n_heads": 3}, "model.n_heads=3 must divide model.d_model=32"),
        ({"data.encoding_errors": "bogus"}, "data.encoding_errors='bogus' is not one of"),
    ]
    for changes, message in cases:
        cfg = tiny_cfg()
        for key, value in changes.items():
            OmegaConf.update(cfg, key, value)
        run = tmp_path / "refused"
        with pytest.raises(FluxtrainError, match=message.replace("$", r"\$").replace("{", r"\{")):
            train(cfg, run)
        assert not run.exists(), changes


def test_train_leaves_torch_threads_as_it_found_them_and_closes_its_writer_on_failure(tiny_cfg, tmp_path, monkeypatch):
    import threading

    before = torch.get_num_threads()
    train(tiny_cfg("train.threads=1"), tmp_path / "ok")
    assert torch.get_num_threads() == before
    threads = {t.name for t in threading.enumerate()}
    poison_training_loss(monkeypatch, 3, float("nan"))
    with pytest.raises(Exception, match="loss became nan"):
        train(tiny_cfg(), tmp_path / "diverged")
    assert {t.name for t in threading.enumerate()} <= threads  # no TensorBoard writer thread left running


def test_a_sample_length_of_zero_turns_samples_off(tiny_cfg, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(tiny_cfg("train.sample_interval=5", "train.sample_len=0"), tmp_path / "off")
    assert "sample at iteration" not in caplog.text
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(tiny_cfg("train.sample_interval=15", "train.sample_len=8"), tmp_path / "on")
    assert caplog.text.count("sample at iteration") == 2  # at 15 and 30
