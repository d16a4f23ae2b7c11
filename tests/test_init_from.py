"""init_from: a fresh run that starts from a model file's weights and tokenizer (fine-tuning)."""

import json
import logging
import math

import pytest
import torch

from fluxtrain.errors import FluxtrainError
from fluxtrain.lr_find import lr_find
from fluxtrain.model_file import read_model_file
from fluxtrain.resume import checkpoint_path
from fluxtrain.train import train

from .conftest import make_text

STILL = ["train.max_iters=1", "optim.lr=1e-12", "optim.min_lr=0", "optim.warmup_iters=0"]  # the weights stay put


@pytest.fixture
def trained(tiny_cfg, tmp_path):
    """A trained tiny run folder and its final validation loss."""
    metrics = train(tiny_cfg("train.max_iters=20"), tmp_path / "base")
    return tmp_path / "base", metrics["final_val_loss"]


def test_a_run_starts_from_the_weights_of_a_model_file_checkpoint_or_run_folder(tiny_cfg, tmp_path, trained, caplog):
    base, loss = trained
    fresh = train(tiny_cfg(*STILL), tmp_path / "fresh")["final_val_loss"]
    assert fresh > loss + 0.2  # 20 iterations of training show
    for name, source in [("folder", base), ("file", base / "model_final.safetensors")]:
        with caplog.at_level(logging.INFO, logger="fluxtrain"):
            metrics = train(tiny_cfg(*STILL, f"init_from={source}"), tmp_path / name)
        assert metrics["final_val_loss"] == pytest.approx(loss, abs=1e-5)
        assert metrics["iters"] == 1  # a fresh run: its own iterations, optimizer and schedule
    assert f"init_from: the run starts from the weights of {base / 'best.safetensors'}" in caplog.text
    train(tiny_cfg("train.max_iters=4", "train.ckpt_interval=2"), tmp_path / "ckpt")
    metrics = train(tiny_cfg(*STILL, f"init_from={checkpoint_path(tmp_path / 'ckpt', 4)}"), tmp_path / "from_ckpt")
    final = read_model_file(tmp_path / "ckpt" / "model_final.safetensors")[1]
    started = read_model_file(tmp_path / "from_ckpt" / "model_final.safetensors")[1]
    assert all((final[k] - started[k]).abs().max() < 1e-6 for k in final)
    assert math.isfinite(metrics["final_val_loss"])


def test_the_run_encodes_its_text_with_the_model_files_tokenizer(tiny_cfg, tmp_path, trained):
    base, _ = trained
    fewer = tmp_path / "fewer.txt"  # fewer characters: a tokenizer built from this text would be smaller
    fewer.write_text(make_text(20_000, seed=5).replace("k", ""))
    train(tiny_cfg(*STILL, f"init_from={base}", f"data.path={fewer}"), tmp_path / "tuned")
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    unseen = tmp_path / "unseen.txt"
    unseen.write_text(make_text(20_000, seed=5) + "\u00e9")
    with pytest.raises(
        FluxtrainError, match=r"not in the tokenizer's vocabulary: '\u00e9' \(the tokenizer comes from init_from\)"
    ):
        train(tiny_cfg(*STILL, f"init_from={base}", f"data.path={unseen}"), tmp_path / "unseen")
    assert not (tmp_path / "unseen").exists() or not any((tmp_path / "unseen").iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.d_model=64"], r"the model settings describe another model: model.d_model=64 \(model file: 32\)"),
        (["init_from=''"], r"^init_from='' is empty; give a model file, a checkpoint or a run folder"),
        (
            ["init_from=nowhere"],
            r"^init_from=nowhere does not exist \(give a model file, a checkpoint or a run folder\)",
        ),
        (
            ["tokenizer.path={other}"],
            r"tokenizer.path=.*other.json is not the model file's tokenizer, which the run must keep",
        ),
    ],
)
def test_a_model_file_that_does_not_fit_the_settings_is_one_line(tiny_cfg, tmp_path, trained, overrides, message):
    base, _ = trained
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"type": "char", "chars": list("abc")}))
    overrides = [o.replace("{other}", str(other)) for o in overrides]
    with pytest.raises(FluxtrainError, match=message):
        train(tiny_cfg(*STILL, f"init_from={base}", *overrides), tmp_path / "run")


def test_dropout_and_the_tokenizer_files_of_the_model_itself_may_be_given(tiny_cfg, tmp_path, trained):
    base, loss = trained
    own = f"tokenizer.path={base / 'tokenizer.json'}"
    metrics = train(tiny_cfg(*STILL, f"init_from={base}", "model.dropout=0.1", own), tmp_path / "run")
    assert metrics["final_val_loss"] == pytest.approx(loss, abs=1e-5)  # evaluated without dropout


def test_a_resumed_run_continues_from_its_checkpoint_not_the_model_file(tiny_cfg, tmp_path, trained, caplog):
    base, _ = trained
    fewer = tmp_path / "fewer.txt"  # a tokenizer built from it would be smaller than the model's
    fewer.write_text(make_text(20_000, seed=5).replace("k", ""))
    run, same = tmp_path / "run", [f"init_from={base}", f"data.path={fewer}", "model.dropout=0.1"]
    train(tiny_cfg("train.max_iters=2", "train.ckpt_interval=2", *same), run)
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        resumed = train(tiny_cfg("train.max_iters=4", "resume=auto", *same), run)
    assert f"init_from={base} is not used: the run continues from its checkpoint" in caplog.text
    whole = train(tiny_cfg("train.max_iters=4", *same), tmp_path / "whole")
    timing = ("wall_time_sec", "tokens_per_sec")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in whole.items() if k not in timing}
    final = [read_model_file(r / "model_final.safetensors")[1] for r in (run, tmp_path / "whole")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])  # bit-identical to a run never stopped


def test_tokenizer_settings_other_than_the_model_files_are_warned_about(tiny_cfg, tmp_path, trained, caplog):
    base, _ = trained
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train(tiny_cfg("train.max_iters=2", "train.ckpt_interval=2", f"init_from={base}", "tokenizer=bpe"), run)
    assert "holds a char tokenizer, which the run keeps: tokenizer=bpe is not used (give tokenizer=char" in caplog.text
    assert json.loads((run / "tokenizer.json").read_text())["type"] == "char"
    # Resumed with the setting the warning asks for, or without init_from: the run keeps the model's tokenizer.
    assert train(tiny_cfg("train.max_iters=4", "resume=auto", f"init_from={base}", "tokenizer=char"), run)["iters"] == 4
    assert train(tiny_cfg("train.max_iters=6", "train.ckpt_interval=2", "resume=auto"), run)["iters"] == 6
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"type": "char", "chars": list("abc")}))
    with pytest.raises(
        FluxtrainError, match=r"tokenizer.path=.*other.json is not the tokenizer the run fine-tunes with"
    ):
        train(tiny_cfg("train.max_iters=8", "resume=auto", f"tokenizer.path={other}"), run)


def test_init_from_given_to_a_resumed_run_that_did_not_start_so_changes_no_check(tiny_cfg, tmp_path, trained):
    base, _ = trained
    train(tiny_cfg("train.max_iters=2", "train.ckpt_interval=2"), tmp_path / "plain")
    with pytest.raises(FluxtrainError, match=r"tokenizer.kind=bpe \(checkpoint: char\)"):
        train(tiny_cfg("train.max_iters=4", "resume=auto", f"init_from={base}", "tokenizer=bpe"), tmp_path / "plain")


def test_a_file_that_is_no_model_is_named_with_the_setting(tiny_cfg, tmp_path, tiny_text_file):
    with pytest.raises(FluxtrainError, match=f"^init_from={tiny_text_file}: {tiny_text_file} "):
        train(tiny_cfg(*STILL, f"init_from={tiny_text_file}"), tmp_path / "run")


def test_lr_find_tests_the_model_files_weights(tiny_cfg, tmp_path, trained):
    base, loss = trained

    def first_loss(*overrides: str) -> float:
        cfg = tiny_cfg("lr_find.num_steps=10", "lr_find.start_lr=1e-9", "lr_find.end_lr=1e-8", *overrides)
        run = tmp_path / f"lr{len(overrides)}"
        with pytest.raises(FluxtrainError, match="no suggestion"):  # ten steps at tiny rates: a flat curve
            lr_find(cfg, run)
        return json.loads((run / "lr_find.json").read_text())["losses"][0]

    assert first_loss(f"init_from={base}") < first_loss() - 0.2
