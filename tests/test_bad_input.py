"""Bad input fails early with one line naming the problem: corpus files, devices, and the command line."""

import os
import resource
import subprocess
import sys

import pytest

from fluxtrain.errors import FluxtrainError
from fluxtrain.host import resolve_device
from fluxtrain.train import train

from .conftest import REPO_ROOT, TINY_OVERRIDES, run_fluxtrain


def corpus_error(tiny_cfg, tmp_path, path) -> str:
    with pytest.raises(FluxtrainError) as e:
        train(tiny_cfg(f"data.path={path}"), tmp_path / "run")
    message = str(e.value)
    assert "\n" not in message
    assert not (tmp_path / "run" / "model_final.safetensors").exists()
    return message


def test_missing_file(tiny_cfg, tmp_path):
    path = tmp_path / "nope.txt"
    assert corpus_error(tiny_cfg, tmp_path, path) == f"data.path: file {path} does not exist"


def test_empty_file(tiny_cfg, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    assert corpus_error(tiny_cfg, tmp_path, path) == f"data.path: file {path} is empty"


def test_non_utf8_file(tiny_cfg, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    message = corpus_error(tiny_cfg, tmp_path, path)
    assert str(path) in message and "not valid UTF-8" in message and "byte offset 3" in message


def test_too_short_file(tiny_cfg, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be, " * 3)  # 60 chars: the 10% val split is shorter than seq_len + 1 = 17
    message = corpus_error(tiny_cfg, tmp_path, path)
    assert str(path) in message and "too short" in message and "val split has 6 tokens" in message


def test_bad_optimizer_setting_is_named_before_the_data_is_read(tiny_cfg, tmp_path):
    missing = tmp_path / "nope.txt"  # would fail too, but only once the data is read
    with pytest.raises(FluxtrainError, match="optim.schedule='cosin' is not one of cosine, linear, wsd"):
        train(tiny_cfg("optim.schedule=cosin", f"data.path={missing}"), tmp_path / "run")


def test_unavailable_device_is_named():
    if not __import__("torch").cuda.is_available():
        with pytest.raises(FluxtrainError, match="train.device=cuda: CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(FluxtrainError, match="train.device='tpu'"):
        resolve_device("tpu")


def test_cli_prints_one_line_error_without_traceback(tmp_path):
    missing = tmp_path / "missing.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain", *TINY_OVERRIDES, f"data.path={missing}", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert f"error: data.path: file {missing} does not exist" in output
    assert "Traceback" not in output


def test_cli_typo_fails_before_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "model.d_modle=64", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "d_modle" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def error_line_of_a_run_out_of_memory(tmp_path, *overrides: str, limit: int | None = None) -> str:
    """The one `error:` line of a run with `overrides` that runs out of memory (under an address-space `limit` in
    bytes where given), which must end with status 1 and no traceback."""
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 200)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-m", "fluxtrain", *TINY_OVERRIDES, *overrides, f"data.path={text}"]
    limited = None if limit is None else (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    proc = subprocess.run(
        [*args, f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, preexec_fn=limited,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    (line,) = [line for line in output.splitlines() if "error:" in line]
    return line


def test_running_out_of_memory_is_one_line_naming_what_to_lower(tmp_path):
    line = error_line_of_a_run_out_of_memory(tmp_path, "train.batch_size=1000000000000")
    assert "error: out of memory (RuntimeError: " in line and line.endswith("train.activation_checkpointing=true")
    assert "lower train.batch_size" in line


def test_running_out_of_host_memory_in_numpy_is_the_same_one_line(tmp_path):
    """A batch of 10**8 windows: numpy's MemoryError (26 GB of int64 ids, under a 6 GB address-space limit)."""
    line = error_line_of_a_run_out_of_memory(tmp_path, "train.batch_size=100000000", limit=6 * 2**30)
    assert "error: out of memory (" in line and "MemoryError" in line and "lower train.batch_size" in line
    assert line in (tmp_path / "run" / "train.log").read_text()  # the run's log says why it ended


def test_a_long_message_is_cut_after_a_word_near_the_limit_else_at_the_limit():
    from fluxtrain.errors import describe_failure

    words = RuntimeError("Error code 12 " + "word " * 40)
    assert describe_failure(words, 40) == "RuntimeError: Error code 12 word word word word word..."
    assert describe_failure(RuntimeError("a, " + "y" * 200), 40) == "RuntimeError: a, " + "y" * 37 + "..."
    assert describe_failure(ValueError("short one")) == "ValueError: short one"


def test_a_model_too_large_for_memory_is_one_line_naming_the_model_settings(tmp_path):
    """Its attention weights alone, 12.9 GB, under a 6 GB address-space limit: a smaller batch cannot help."""
    line = error_line_of_a_run_out_of_memory(tmp_path, "model.d_model=32768", "model.n_heads=1", limit=6 * 2**30)
    assert "error: out of memory building the model (RuntimeError: " in line and "batch_size" not in line
    assert line.endswith("...); use a smaller one: lower model.d_model, model.ff_dim or model.n_layers"), line


def test_a_run_folder_that_cannot_be_written_is_one_line_before_hydra_logs_into_it(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    proc = run_fluxtrain(*TINY_OVERRIDES, f"hydra.run.dir={blocker}/run", "resume=auto")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == f"error: hydra.run.dir={blocker}/run cannot be written: {blocker} is a file, not a folder\n"


@pytest.mark.parametrize("parent_exists", [True, False])
def test_a_run_folder_name_too_long_is_one_line_and_leaves_no_folder(tmp_path, parent_exists):
    """Over 255 bytes: where a folder on the way is missing, the OS says "no such file" before "too long", and Hydra
    failed making the folder, with a traceback and the missing folders left behind."""
    parent = tmp_path if parent_exists else tmp_path / "new"
    proc = run_fluxtrain(*TINY_OVERRIDES, f"hydra.run.dir={parent / ('a' * 300)}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: hydra.run.dir=") and proc.stderr.count("\n") == 1
    assert proc.stderr.endswith(" is longer than 255 bytes\n") and list(tmp_path.iterdir()) == []


def test_a_disk_with_no_room_is_one_line_before_hydra_writes_its_config(tmp_path):
    """An empty file can still be made on a full disk; the check writes what Hydra writes first. A file-size limit
    of 20,000 bytes (as a nearly full disk) stops the check's 64 KiB, where Hydra's config files would have fitted
    half-written."""
    limit = 20_000
    proc = subprocess.run(
        [sys.executable, "-m", "fluxtrain", *TINY_OVERRIDES, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr == (
        f"error: hydra.run.dir={tmp_path / 'run'} cannot be written: cannot create a file in {tmp_path} "
        "(File too large)\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sweep", [False, True])
def test_a_read_only_run_or_sweep_folder_is_refused_before_hydra_starts(tmp_path, monkeypatch, capsys, sweep):
    import errno

    import fluxtrain.files
    from fluxtrain.__main__ import main

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    folder = tmp_path / "finished run"
    folder.mkdir()
    monkeypatch.setattr(fluxtrain.files.tempfile, "TemporaryFile", read_only)
    setting = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    argv = ["fluxtrain", *(["-m"] if sweep else []), f"{setting}='{folder}'", "resume=auto"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as info:
        main(entry=lambda: pytest.fail("Hydra started"))
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"error: {setting}={folder} cannot be written: cannot create a file in {folder} (Read-only file system)\n"
    )


def test_ctrl_c_while_hydra_composes_the_config_is_one_line(monkeypatch, capsys):
    from fluxtrain.__main__ import main

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["fluxtrain", "model=small"])
    with pytest.raises(SystemExit) as info:
        main(entry=interrupted)
    assert info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_run_or_sweep_folder_under_home_is_read_as_the_other_path_settings_read_it(tmp_path, monkeypatch):
    from fluxtrain.overrides import hydra_value
    from fluxtrain.run_folder import expand_home_in_run_dirs

    monkeypatch.setenv("HOME", str(tmp_path))
    args = ['hydra.run.dir="~/runs/a b"', "hydra.sweep.dir='~/sweeps'", "data.path=notes.txt", "-m"]
    expanded = expand_home_in_run_dirs(args)
    assert hydra_value(expanded[0]) == f"{tmp_path}/runs/a b" and hydra_value(expanded[1]) == f"{tmp_path}/sweeps"
    assert expanded[2:] == args[2:]
    assert expand_home_in_run_dirs(["hydra.run.dir=/x/~y", 'hydra.run.dir="~nosuchuser9/x"']) == [
        "hydra.run.dir=/x/~y",
        'hydra.run.dir="~nosuchuser9/x"',
    ]


def test_a_run_refused_at_setup_leaves_no_folder_behind(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's\n")
    for where in ([], ["hydra.run.dir=mine"]):  # Hydra's own outputs/<date>/<time>/, and a folder that was there
        proc = subprocess.run(
            [sys.executable, "-m", "fluxtrain", "model=small", "model.n_heads=3", *where],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1 and "error: model.n_heads=3 must divide model.d_model=128" in proc.stdout
        assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
            "mine",
            "mine/notes.txt",
            *(["mine/train.log"] if where == ["hydra.run.dir=mine"] else []),
        ], where


def test_hydras_bare_options_may_come_after_the_settings(monkeypatch):
    from fluxtrain.__main__ import main

    seen = []
    argv = ["fluxtrain", "model=small", "-m", "optim.lr=1e-3,3e-3", "--multirun", "hydra.sweep.dir=x"]
    monkeypatch.setattr(sys, "argv", argv)
    main(entry=lambda: seen.append(list(sys.argv[1:])))
    assert seen == [["-m", "--multirun", "model=small", "optim.lr=1e-3,3e-3", "hydra.sweep.dir=x"]]


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        ("fluxtrain.runs", ["--keys"], "python -m fluxtrain.runs: error: argument --keys: expected one argument"),
        ("fluxtrain.export", [], "python -m fluxtrain.export: error: the following arguments are required: model"),
        ("fluxtrain.evaluate", ["m", "--batch-size", "x"], "error: argument --batch-size: invalid int value: 'x'"),
    ],
)
def test_a_command_line_mistake_is_one_line_not_the_usage_text(module, argv, expected, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and err.endswith("(see --help)\n")
    assert len(err.splitlines()) == 1


def test_a_file_name_too_long_is_one_line_in_every_command(tiny_cfg, tiny_text_file, tmp_path, capsys):
    """A path the OS refuses (here a name over 255 bytes) where no closer check looked: `path: reason`."""
    from fluxtrain import evaluate, export, generate, runs
    from fluxtrain.model import GPT, ModelConfig
    from fluxtrain.model_file import save_model_file
    from fluxtrain.tokenizer import CharTokenizer

    long = tmp_path / ("a" * 300)
    tokenizer = CharTokenizer.train(tiny_text_file.read_text())
    model_file = tmp_path / "model.safetensors"
    save_model_file(
        model_file, GPT(ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32), tokenizer.vocab_size), tokenizer
    )
    text = str(tiny_text_file)
    for main, argv in (
        (evaluate.main, [str(long), "--data", text]),
        (evaluate.main, [str(model_file), "--data", str(long)]),
        (evaluate.main, [str(model_file), "--data", text, "--json", str(long)]),
        (export.main, [str(long), str(tmp_path / "hf")]),
        (export.main, [str(model_file), str(long)]),
        (runs.main, [str(long)]),
        (generate.main, [str(long), "--prompt", "a"]),
    ):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        too_long = "File name too long" in err or "is longer than 255 bytes" in err  # an output's name, checked first
        assert too_long and "Traceback" not in err, (argv, err)
    for setting in ("data.path", "resume"):
        proc = run_fluxtrain(
            *TINY_OVERRIDES, f"data.path={text}", f"{setting}={long}", f"hydra.run.dir={tmp_path / 'run'}"
        )
        (line,) = [line for line in proc.stderr.splitlines() + proc.stdout.splitlines() if "error:" in line]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and "File name too long" in line, proc.stderr
        assert not (tmp_path / "run").exists()
