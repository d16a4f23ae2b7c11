"""The console and train.log handlers: every line is written, a file name that is not UTF-8 with escapes."""

import io
import logging
import logging.config
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from fluxtrain.logs import printable

from .conftest import REPO_ROOT, TINY_OVERRIDES, compose_config


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_undecodable_file_names_are_logged_with_escapes(tmp_path, monkeypatch, restore_logging, capsys):
    hydra = compose_config(["model=small"], return_hydra_config=True).hydra
    config = OmegaConf.to_container(hydra.job_logging, resolve=False)
    config["handlers"]["file"]["filename"] = str(tmp_path / "train.log")
    console = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr("sys.stdout", console)
    logging.config.dictConfig(config)
    name = os.fsdecode(b"/data/\xffname\xc3\xa9.txt")  # as os.listdir gives it: U+DCFF for the bad byte
    logging.getLogger("fluxtrain.sources").warning(f"{name} is not valid UTF-8")
    logging.getLogger("fluxtrain").info("after")
    logging.shutdown()
    expected = "/data/\\xffnameé.txt is not valid UTF-8"
    log = (tmp_path / "train.log").read_text(encoding="utf-8")
    printed = console.buffer.getvalue().decode("utf-8")
    for text in (log, printed):
        assert expected in text and "after" in text and "Logging error" not in text
    assert "Logging error" not in capsys.readouterr().err


def test_printable_escapes_only_lone_surrogates_and_control_characters():
    assert printable("plain é 雷 🌩\n\tindented") == "plain é 雷 🌩\n\tindented"
    assert printable("a\udcffb\ud800c") == "a\\xffb\\ud800c"
    assert printable("\x1b[2J\x1b]0;title\x07 \r\x7f\x9b") == "\\x1b[2J\\x1b]0;title\\x07 \\x0d\\x7f\\x9b"


def test_a_sample_of_text_with_terminal_escapes_is_logged_escaped(tmp_path):
    """A model trained on text with ANSI escapes writes them in its samples: the console and train.log show them as
    `\\x1b`, never as the bytes that would clear the screen or retitle the terminal."""
    text = tmp_path / "ansi.txt"
    text.write_text("\x1b[2J\x1b]0;title\x07 hello\n" * 300)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = tmp_path / "run"
    overrides = ["train.max_iters=2", "train.sample_interval=2", "train.sample_len=200", "train.eval_iters=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain", *TINY_OVERRIDES, *overrides, f"data.path={text}", f"hydra.run.dir={run}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run / "train.log").read_text()
    sample = log.split("sample at iteration 2:\n", 1)[1]
    assert "\\x1b" in sample or "\\x07" in sample  # 200 tokens drawn from a vocabulary of 13 characters
    for shown in (log, proc.stdout, proc.stderr):
        assert not set(shown) & {"\x1b", "\x07"}
