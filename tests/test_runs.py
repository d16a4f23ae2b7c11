"""Reading finished runs from disk: the run folders under an outputs folder, their table, failed jobs."""

import json

import pytest
from omegaconf import OmegaConf

from fluxtrain.runs import find_runs, format_table, runs_table


def make_run(folder, lr: float, metrics: dict | None = None, error: str | None = None) -> None:
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save({"model": {"d_model": 32, "n_layers": 2}, "optim": {"lr": lr}}, folder / ".hydra" / "config.yaml")
    OmegaConf.save([f"optim.lr={lr}"], folder / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "failed.json").write_text(json.dumps({"error": error, "type": "FluxtrainError", "overrides": []}))


def test_finished_failed_and_unfinished_runs_in_one_table(tmp_path):
    sweep = tmp_path / "multirun"
    make_run(sweep / "0", 1e-3, metrics={"final_val_loss": 1.91234, "best_val_loss": 1.9, "wall_time_sec": 12.0})
    make_run(sweep / "1", 3e-2, error="loss became nan at iteration 7")
    make_run(sweep / "2", 3e-4)  # still running: neither metrics.json nor failed.json, so not a run yet
    runs = find_runs(sweep)
    assert [r.name for r in runs] == ["0", "1"]
    assert runs[0].get("optim.lr") == 1e-3 and runs[0].get("optim.nope") is None
    assert runs[0].overrides == ["optim.lr=0.001"]
    rows = runs_table(runs, keys=("optim.lr",), metrics=("final_val_loss", "best_val_loss"))
    assert rows == [
        {"run": "0", "optim.lr": 1e-3, "final_val_loss": 1.91234, "best_val_loss": 1.9, "status": "ok"},
        {"run": "1", "optim.lr": 3e-2, "final_val_loss": None, "best_val_loss": None,
         "status": "failed: loss became nan at iteration 7"},
    ]  # fmt: skip
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["run", "optim.lr", "final_val_loss", "best_val_loss", "status"]
    assert lines[1].split() == ["0", "0.001", "1.912", "1.9", "ok"]
    assert lines[2].split()[:4] == ["1", "0.03", "-", "-"] and lines[2].endswith(
        "failed: loss became nan at iteration 7"
    )
    with pytest.raises(FileNotFoundError, match="holds no model file"):
        runs[0].model_file()
    assert format_table([{"tokens_per_sec": 41093.7, "wall_time_sec": 1.6321}]).splitlines()[1].split() == [
        "41,094",
        "1.632",
    ]


def test_an_empty_folder_has_no_runs_and_a_missing_one_is_an_error(tmp_path):
    assert find_runs(tmp_path) == [] and format_table(runs_table([])) == "(no runs)"
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_runs(tmp_path / "missing")
