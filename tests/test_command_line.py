"""The commands when the reader of their stdout has left (`| head`, `| true`): they stop quietly with status 1, as
`python -m fluxtrain.generate` does, instead of a BrokenPipeError traceback."""

import os
import subprocess
import sys

import pytest
import torch

from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import save_model_file
from fluxtrain.tokenizer import CharTokenizer

from .conftest import REPO_ROOT, make_text
from .test_runs import make_run


def run_with_stdout_closed(*args: str) -> subprocess.CompletedProcess:
    """`python ARGS` at the repository root with stdout a pipe whose reader has left: every write to it fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        return subprocess.run(
            [sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True,
            timeout=300,
        )  # fmt: skip
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [["--help"], ["model=small", "--cfg", "job"], ["--info"]])
def test_fluxtrain_stops_quietly_when_hydras_output_has_no_reader(args):
    proc = run_with_stdout_closed("-m", "fluxtrain", *args)
    assert (proc.returncode, proc.stderr) == (1, "")


def test_the_runs_table_stops_quietly_when_it_has_no_reader(tmp_path):
    for i in range(5):
        make_run(tmp_path / "sweep" / str(i), 10 ** -(i + 1), metrics={"best_val_loss": 2.0 + i})
    proc = run_with_stdout_closed("-m", "fluxtrain.runs", str(tmp_path / "sweep"))
    assert (proc.returncode, proc.stderr) == (1, "")


@pytest.mark.parametrize("json_out", [[], ["--json", "-"]])
def test_an_evaluation_stops_quietly_when_it_has_no_reader(tmp_path, json_out):
    tokenizer = CharTokenizer.train(make_text(5_000))
    model = GPT(ModelConfig(d_model=32, n_heads=2, n_layers=1, ff_dim=64, seq_len=16), tokenizer.vocab_size)
    with torch.no_grad():
        save_model_file(tmp_path / "model.safetensors", model.eval(), tokenizer)
    (tmp_path / "text.txt").write_text(make_text(2_000), encoding="utf-8")
    args = ["--data", str(tmp_path / "text.txt"), "--device", "cpu", *json_out]
    proc = run_with_stdout_closed("-m", "fluxtrain.evaluate", str(tmp_path / "model.safetensors"), *args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_shell_completion_reaches_hydra():
    """`-sc install=bash` and `-sc query=bash` give Hydra words that are no settings: they are Hydra's to read."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    install = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "-sc", "install=bash"], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert install.returncode == 0 and "hydra_bash_completion()" in install.stdout, install.stderr
    query = subprocess.run(
        [sys.executable, "-m", "fluxtrain", "-sc", "query=bash"], cwd=REPO_ROOT, capture_output=True, text=True,
        env={**env, "COMP_LINE": "python fluxtrain/__main__.py mod"}, timeout=120,
    )  # fmt: skip
    assert query.returncode == 0 and "model=" in query.stdout.split(), query.stderr
