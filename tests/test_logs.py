"""The console and train.log handlers: every line is written, a file name that is not UTF-8 with escapes."""

import io
import logging
import logging.config
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from fluxtrain.logs import LogFileHandler, printable
from fluxtrain.train import train

from .conftest import REPO_ROOT, TINY_OVERRIDES, compose_config, run_fluxtrain


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
    assert printable("a sample of CRLF text\r\nits next line\r\n") == "a sample of CRLF text\nits next line\n"


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


def test_on_a_terminal_log_lines_go_above_the_progress_bar(tiny_text_file, tmp_path):
    """The bar (tqdm, shown on a terminal only) is cleared before each log line and drawn again below it: a log line
    never starts at the end of the bar's line."""
    pexpect = pytest.importorskip("pexpect")
    overrides = ["train.max_iters=300", "train.log_interval=100", "train.eval_interval=100", "train.eval_iters=1"]
    args = ["-m", "fluxtrain", *TINY_OVERRIDES, *overrides, f"data.path={tiny_text_file}"]
    args += [f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = pexpect.spawn(sys.executable, args, cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    shown = child.before
    assert child.exitstatus == 0, shown[-2000:]
    assert "it/s]" in shown and "train: " in shown  # the bar was drawn
    assert "iter    300/300 | loss" in shown and "done: 300 iterations" in shown
    assert "it/s][" not in shown  # e.g. "| 92/300 [00:00<00:00, 346.09it/s][2026-11-28 ...][fluxtrain][INFO] - iter"


def test_no_bar_where_stderr_is_not_a_terminal(tiny_text_file, tmp_path):
    """tqdm draws on stderr: stdout on a terminal and stderr into a file gives no bar in the file (nor on stdout)."""
    pexpect = pytest.importorskip("pexpect")
    args = ["-m", "fluxtrain", *TINY_OVERRIDES, "train.max_iters=300", f"data.path={tiny_text_file}"]
    args += [f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    command = " ".join(shlex.quote(a) for a in [sys.executable, *args]) + f" 2>{shlex.quote(str(tmp_path / 'err'))}"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = pexpect.spawn("bash", ["-c", command], cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before[-2000:]
    assert "done: 300 iterations" in child.before and "it/s]" not in child.before
    assert "it/s]" not in (tmp_path / "err").read_text()


def test_on_a_terminal_a_console_piped_into_head_stops_quietly(tiny_text_file, tmp_path):
    """The bar on the terminal (stderr), the log lines into `| head`, which leaves: the console's handler stops
    after the first failed write, as without a bar, instead of a logging error for every later line."""
    pexpect = pytest.importorskip("pexpect")
    args = [
        "-m",
        "fluxtrain",
        *TINY_OVERRIDES,
        "train.max_iters=600",
        "train.log_interval=20",
        "train.eval_interval=300",
    ]
    args += [f"data.path={tiny_text_file}", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    command = " ".join(shlex.quote(a) for a in [sys.executable, *args]) + " | head -3"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = pexpect.spawn("bash", ["-c", command], cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert "it/s]" in child.before and "Logging error" not in child.before and "Traceback" not in child.before
    assert (tmp_path / "run" / "metrics.json").is_file()  # the run went on to its end


def test_events_that_cannot_be_written_end_the_run_in_one_line(tiny_cfg, tmp_path, full_disk_after_20_events, capfd):
    """A full disk under TensorBoard's writer thread: its traceback is left out, and the next call of the writer
    names the event file and the OS error (the command line adds the last good checkpoint)."""
    from fluxtrain.files import WriteError

    with pytest.raises(WriteError) as info:
        train(tiny_cfg("train.max_iters=200", "train.log_interval=1", "train.ckpt_interval=50"), tmp_path)
    (events,) = tmp_path.glob("events.out.tfevents.*")
    assert str(info.value) == f"cannot write {events}: No space left on device"
    assert full_disk_after_20_events == [] and "Traceback" not in capfd.readouterr().err


class FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_log_file_that_cannot_be_written_says_so_once_and_stops(tmp_path, capsys):
    handler = LogFileHandler(tmp_path / "train.log", delay=True)
    handler.stream = FullDisk()
    logger = logging.getLogger("fluxtrain.test_full_disk")
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.warning(f"line {i}")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert (
        err
        == f"warning: {tmp_path / 'train.log'} cannot be written (No space left on device); its log lines stop here\n"
    )


def test_training_goes_on_quietly_when_the_reader_of_its_console_leaves(tiny_text_file, tmp_path):
    """`python -m fluxtrain ... | head`: the console's lines stop, the run and train.log go on, with no logging error
    for every line."""
    from .test_command_line import run_with_stdout_closed

    run = tmp_path / "run"
    proc = run_with_stdout_closed(
        "-m", "fluxtrain", *TINY_OVERRIDES, f"data.path={tiny_text_file}", f"hydra.run.dir={run}"
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "done: 30 iterations" in (run / "train.log").read_text() and (run / "metrics.json").is_file()


@pytest.mark.parametrize("option", ["disabled", "stdout"])
def test_hydra_s_own_job_logging_options_replace_fluxtrain_s(tiny_text_file, tmp_path, option):
    run = tmp_path / "run"
    proc = run_fluxtrain(
        *TINY_OVERRIDES, f"data.path={tiny_text_file}", f"hydra.run.dir={run}", f"hydra/job_logging={option}"
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (run / "metrics.json").is_file() and not (run / "train.log").exists()
    assert ("done: 30 iterations" in proc.stdout) == (option == "stdout")


def test_a_run_with_its_logging_disabled_still_says_where_it_stopped(tiny_text_file, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("train.max_iters")]
    overrides += [f"data.path={tiny_text_file}", "train.max_iters=100000", "train.ckpt_interval=5"]
    cmd = [sys.executable, "-m", "fluxtrain", *overrides, f"hydra.run.dir={run_dir}", "hydra/job_logging=disabled"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list(run_dir.glob("checkpoints/*.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=120)[1].decode()
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert re.fullmatch(r"error: stopped by SIGTERM; checkpoint \S+/checkpoints/iter_\d+\.ckpt\n", stderr), stderr


def test_a_run_with_its_logging_disabled_still_says_why_it_failed(tiny_text_file, tmp_path):
    """A value the schema's types allow but the run refuses is checked once the job starts, under its logging."""
    run = tmp_path / "run"
    proc = run_fluxtrain(
        *TINY_OVERRIDES,
        f"data.path={tiny_text_file}",
        f"hydra.run.dir={run}",
        "hydra/job_logging=disabled",
        "optim.name=sgd",
    )
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "error: optim.name='sgd' is not one of adam, adamw, muon\n"
