"""notebooks/explore_runs.ipynb runs end to end on a tiny sweep made here, and is committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from torch.utils.tensorboard import SummaryWriter

from fluxtrain.runs import read_scalars
from fluxtrain.train import train

from .conftest import REPO_ROOT, run_fluxtrain, tiny_except

NOTEBOOK = REPO_ROOT / "notebooks" / "explore_runs.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def outputs_text(cell) -> str:
    """What the cell printed (stdout: not the warnings a fresh machine may add, e.g. matplotlib's font cache)."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def execute_notebook(outputs: Path, monkeypatch) -> list:
    """The notebook's code cells after running it on the folder `outputs`; none of them may raise."""
    monkeypatch.setenv("FLUXTRAIN_OUTPUTS", str(outputs))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"]
    return code


@pytest.mark.slow
def test_notebook_explores_a_tiny_sweep(tiny_text_file, tmp_path, monkeypatch):
    sweep = tmp_path / "outputs" / "sweep"
    proc = run_fluxtrain(
        "-m",
        *tiny_except("optim.lr"),
        "optim.lr=1e-3,3e-3",
        f"data.path={tiny_text_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    code = execute_notebook(tmp_path / "outputs", monkeypatch)

    # The table lists both runs with their learning rate and their metrics.json figures.
    table = outputs_text(code[1])
    assert "2 runs under" in table
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith("sweep/")}
    assert set(rows) == {"sweep/0", "sweep/1"}
    best_loss = {job: json.loads((sweep / job / "metrics.json").read_text())["best_val_loss"] for job in ("0", "1")}
    assert list(rows) == [f"sweep/{job}" for job in sorted(best_loss, key=best_loss.get)]  # ranked, best first
    assert table.splitlines()[2].split()[:3] == ["run", "optim.lr", "best_val_loss"]  # the setting that differs
    for job, lr in (("0", "0.001"), ("1", "0.003")):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert f" {lr} " in rows[f"sweep/{job}"]
        assert f"{metrics['best_val_loss']:.4g}" in rows[f"sweep/{job}"] and rows[f"sweep/{job}"].endswith("ok")

    # One figure with the train and val curves of both runs, read from their event files.
    assert len([o for o in code[2].outputs if "image/png" in o.get("data", {})]) == 1
    curves = outputs_text(code[2]).splitlines()
    assert len(curves) == 4
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert f"sweep/{job} val/loss: 2 points, last {metrics['final_val_loss']:.4f} at iteration 30" in curves
        assert f"sweep/{job} train/loss: 3 points," in outputs_text(code[2])

    # A sample of 300 characters from the corpus's alphabet, taken from the better run's model file.
    best = min(("0", "1"), key=lambda j: json.loads((sweep / j / "metrics.json").read_text())["best_val_loss"])
    header, sample = outputs_text(code[3]).split(":\n\n", 1)
    assert header == str(sweep / best / "best.safetensors")
    assert len(sample) == 300 + 1 and set(sample) <= set(tiny_text_file.read_text())  # print adds a newline


@pytest.mark.slow
def test_notebook_says_when_no_run_finished(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"  # e.g. an Optuna sweep whose trials all failed: failed.json, no metrics.json
    for job in ("0", "1"):
        (sweep / job).mkdir(parents=True)
        report = {"error": f"loss became nan at iteration {job}", "type": "FluxtrainError", "overrides": []}
        (sweep / job / "failed.json").write_text(json.dumps(report))
    (sweep / "2" / "checkpoints").mkdir(parents=True)  # stopped before it finished: unfinished, not failed
    (sweep / "2" / "checkpoints" / "iter_000005.ckpt").write_bytes(b"")

    code = execute_notebook(sweep, monkeypatch)
    assert "3 runs under" in outputs_text(code[1]) and "failed: loss became nan at iteration 1" in outputs_text(code[1])
    assert "unfinished (iter 5)" in outputs_text(code[1])
    counts = "2 failed, 1 unfinished (see the table)"
    assert outputs_text(code[2]) == f"no finished run under {sweep}: {counts}; no curves to plot\n"
    assert not [o for o in code[2].outputs if "image/png" in o.get("data", {})]
    assert outputs_text(code[3]) == f"no finished run under {sweep}: {counts}; no sample\n"

    missing = tmp_path / "no outputs yet"
    code = execute_notebook(missing, monkeypatch)
    assert outputs_text(code[1]).startswith(
        f"{missing} is not a folder: train a run first (python -m fluxtrain) or set OUTPUTS above\n0 runs under"
    )
    none = "0 failed, 0 unfinished (see the table)"
    assert outputs_text(code[3]) == f"no finished run under {missing}: {none}; no sample\n"


@pytest.mark.slow
def test_notebook_skips_a_curve_without_points(tiny_cfg, tiny_text_file, tmp_path, monkeypatch):
    # A run folder whose events hold no train/loss curve: a tiny run's val/loss points alone, written again.
    # Its text has no newline, which the sample then cannot start from.
    one_line = tmp_path / "one_line.txt"
    one_line.write_text(tiny_text_file.read_text().replace("\n", " "))
    run = tmp_path / "short"
    train(tiny_cfg(f"data.path={one_line}"), run)
    steps, values = read_scalars(run, "val/loss")
    for events in run.glob("events.out.tfevents.*"):
        events.unlink()
    with SummaryWriter(str(run)) as writer:
        for step, value in zip(steps, values, strict=True):
            writer.add_scalar("val/loss", value, step)

    code = execute_notebook(run, monkeypatch)
    assert outputs_text(code[2]).splitlines() == [
        "short train/loss: no points, not plotted",
        f"short val/loss: 2 points, last {values[-1]:.4f} at iteration 30",
    ]
    assert len([o for o in code[2].outputs if "image/png" in o.get("data", {})]) == 1
    header, sample = outputs_text(code[3]).split(":\n\n", 1)
    assert header == str(run / "best.safetensors") and len(sample) == 300 + 1 and "\n" not in sample[:-1]
