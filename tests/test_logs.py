"""The console and train.log handlers: every line is written, a file name that is not UTF-8 with escapes."""

import io
import logging
import logging.config
import os

import pytest
from omegaconf import OmegaConf

from fluxtrain.logs import printable

from .conftest import compose_config


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


def test_printable_escapes_only_lone_surrogates():
    assert printable("plain é 雷 🌩") == "plain é 雷 🌩"
    assert printable("a\udcffb\ud800c") == "a\\xffb\\ud800c"
