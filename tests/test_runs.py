"""Reading finished runs from disk: the run folders under an outputs folder, their table, failed jobs."""

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch.utils.tensorboard import SummaryWriter

from fluxtrain.runs import (
    Run,
    best_runs,
    find_runs,
    format_table,
    load_saved_yaml,
    main,
    ranked_table,
    read_scalars,
    runs_table,
    varying_keys,
    with_overrides,
)


def make_run(folder, lr: float, metrics: dict | None = None, error: str | None = None, n_layers: int = 2) -> None:
    (folder / ".hydra").mkdir(parents=True)
    config = {"model": {"d_model": 32, "n_layers": n_layers}, "optim": {"lr": lr, "betas": [0.9, 0.99]}}
    OmegaConf.save(config, folder / ".hydra" / "config.yaml")
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


def test_a_job_that_failed_where_an_earlier_sweeps_job_finished_shows_its_own_settings_and_no_results(tmp_path):
    # The earlier sweep's job 0 finished at lr 1e-3; this sweep's job 0 (lr 3e-2) was refused at setup, which put the
    # earlier job's config back beside its metrics.json.
    make_run(tmp_path / "0", 1e-3, metrics={"best_val_loss": 1.9, "iters": 300})
    report = {"error": "model.n_heads=3 must divide model.d_model=32", "type": "FluxtrainError"}
    report["overrides"] = ["optim.lr=3e-2", "model=small", "+extra=1"]
    (tmp_path / "0" / "failed.json").write_text(json.dumps(report))
    make_run(tmp_path / "1", 3e-3, metrics={"best_val_loss": 2.1})
    runs = find_runs(tmp_path)
    assert runs[0].metrics is None and runs[0].error == report["error"]
    assert runs[0].get("optim.lr") == 3e-2 and runs[0].get("model.d_model") == 32 and runs[0].get("extra") is None
    assert runs[0].overrides == report["overrides"] and runs[0].setting("model") == "small"
    rows = runs_table(runs, keys=("optim.lr",), metrics=("best_val_loss",))
    assert [(r["run"], r["optim.lr"], r["best_val_loss"], r["status"]) for r in rows] == [
        ("0", 3e-2, None, "failed: model.n_heads=3 must divide model.d_model=32"),
        ("1", 3e-3, 2.1, "ok"),
    ]


def test_an_empty_folder_has_no_runs_and_a_missing_one_is_an_error(tmp_path):
    assert find_runs(tmp_path) == [] and format_table(runs_table([])) == "(no runs)"
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_runs(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing is not a folder"):
        read_scalars(tmp_path / "missing", "val/loss")


def compare(capsys, *args: str) -> tuple[int, str, str]:
    """`python -m fluxtrain.runs ARGS`: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_runs_command_ranks_runs_by_best_val_loss_showing_the_settings_that_differ(tmp_path, capsys):
    sweep = tmp_path / "multirun"
    for job, lr, best in [(0, 1e-3, 1.9), (2, 3e-3, 1.7), (10, 1e-2, 1.8)]:
        metrics = {"best_val_loss": best, "final_val_loss": best + 0.01, "tokens_per_sec": 20000.0}
        make_run(sweep / str(job), lr, metrics=metrics)
    make_run(sweep / "1", 3e-2, error="loss became nan at iteration 7", n_layers=4)
    assert [r.name for r in find_runs(sweep)] == ["0", "1", "2", "10"]  # job 10 after job 2
    code, out, err = compare(capsys, str(sweep))
    assert code == 0 and err == ""
    header, *rows = [line.split() for line in out.splitlines()]
    # optim.lr and model.n_layers differ between the runs; model.d_model and optim.betas do not.
    metrics = ["best_val_loss", "final_val_loss", "tokens_per_sec", "wall_time_sec"]
    assert header == ["run", "model.n_layers", "optim.lr", *metrics, "status"]
    assert [row[:4] for row in rows] == [
        ["2", "2", "0.003", "1.7"],
        ["10", "2", "0.01", "1.8"],
        ["0", "2", "0.001", "1.9"],
        ["1", "4", "0.03", "-"],
    ]
    assert rows[0][5] == "20,000" and out.splitlines()[-1].endswith("failed: loss became nan at iteration 7")

    code, out, _ = compare(capsys, str(sweep), "--keys", "model.d_model")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["run", "model.d_model", "best_val_loss"]
    code, out, err = compare(capsys, str(sweep), "--keys", "optim.lr,model.d_modle")
    assert (code, out) == (1, "")
    assert err == "error: --keys: no run has the setting model.d_modle (did you mean model.d_model?)\n"
    code, out, err = compare(capsys, str(sweep), "--keys", "optim.lr,")
    assert (code, out) == (1, "")
    assert err == "error: --keys 'optim.lr,' has an empty name; separate settings by single commas\n"
    code, out, _ = compare(capsys, str(sweep), "--keys", "optim.lr, model.d_model")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["run", "optim.lr", "model.d_model"]


def test_the_runs_command_names_a_missing_empty_or_damaged_folder(tmp_path, capsys):
    assert compare(capsys, str(tmp_path / "missing"))[::2] == (1, f"error: {tmp_path / 'missing'} is not a folder\n")
    code, _, err = compare(capsys, str(tmp_path))
    holds = "metrics.json, failed.json or checkpoints/iter_*.ckpt"
    assert code == 1 and err == f"error: no runs under {tmp_path} (a run folder holds {holds})\n"
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 1.9})
    (tmp_path / "run" / "metrics.json").write_text("{ not json")
    code, out, err = compare(capsys, str(tmp_path))
    assert (code, err) == (0, "")
    assert out.splitlines()[1].startswith("run") and "unreadable metrics.json: Expecting property name" in out


def test_varying_keys_compares_nested_settings_lists_and_missing_keys(tmp_path):
    def run(config: dict) -> Run:
        return Run(tmp_path, "r", config, [], None, None)

    same = {"model": {"d_model": 32}, "optim": {"betas": [0.9, 0.99]}}
    assert varying_keys([run(same), run(same)]) == []
    other = {"model": {"d_model": 32}, "optim": {"betas": [0.9, 0.95]}, "resume": "auto"}
    assert varying_keys([run(same), run(other)]) == ["optim.betas", "resume"]


@pytest.mark.parametrize(
    "name, text, reason",
    [
        ("metrics.json", "[1, 2]", "not a JSON object but list"),
        ("metrics.json", '{"best_val_loss": "abc"}', 'best_val_loss="abc" is not a number'),
        ("metrics.json", '{"best_val_loss": 1.9, "tokens_per_sec": true}', "tokens_per_sec=true is not a number"),
        ("metrics.json", '{"best_val_loss": 1.9, "iters": "300"}', 'iters="300" is not an iteration count'),
        ("metrics.json", '{"best_val_loss": 1.9, "iters": 2.5}', "iters=2.5 is not an iteration count"),
        ("failed.json", '{"error": 5}', 'no "error" message'),
        ("metrics.json", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        ("failed.json", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ],
)
def test_a_damaged_file_is_named_in_its_runs_row_and_the_other_runs_are_compared(tmp_path, capsys, name, text, reason):
    make_run(tmp_path / "ok", 3e-3, metrics={"best_val_loss": 1.9, "tokens_per_sec": None})
    make_run(tmp_path / "run", 1e-3)
    (tmp_path / "run" / name).write_text(text)
    runs = find_runs(tmp_path)
    assert [(r.name, r.unreadable) for r in runs] == [("ok", None), ("run", f"{name}: {reason}")]
    assert runs[1].metrics is None and runs[1].error is None and runs[1].get("optim.lr") == 1e-3
    code, out, err = compare(capsys, str(tmp_path))
    assert (code, err) == (0, "")
    header, ok, damaged = out.splitlines()
    assert header.split()[:2] == ["run", "optim.lr"] and ok.split()[:3] == ["ok", "0.003", "1.9"]
    assert damaged.split()[:2] == ["run", "0.001"] and damaged.endswith(f"unreadable {name}: {reason}")


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        ("config.yaml", "- 1\n", "not a mapping of settings but list"),
        ("overrides.yaml", "- 1\n- [a]\n", "not a list of overrides such as optim.lr=1e-3"),
        ("overrides.yaml", "optim.lr: 1e-3\n", "not a list of overrides such as optim.lr=1e-3"),
    ],
)
def test_saved_hydra_files_of_the_wrong_shape_are_named_in_the_runs_row(tmp_path, capsys, name, text, reason):
    make_run(tmp_path / "ok", 3e-3, metrics={"best_val_loss": 1.9})
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 2.1})
    (tmp_path / "run" / ".hydra" / name).write_text(text)
    code, out, err = compare(capsys, str(tmp_path))
    assert (code, err) == (0, "")
    assert out.splitlines()[2].endswith(f"unreadable .hydra/{name}: {reason}")


def test_a_failed_job_s_overrides_apply_those_that_parse():
    nested = "model.n_heads=" + "[" * 500 + "]" * 500  # a failed.json edited by hand: past the parser's recursion limit
    config = {"model": {"n_heads": 2, "d_model": 32}}
    applied = with_overrides(config, [nested, "model.d_model=64", "model.d_modl=8"])
    assert applied == {"model": {"n_heads": 2, "d_model": 64}}


def test_saved_settings_read_as_omegaconf_reads_them(tmp_path):
    """Floats without a dot (1e-3), dates (left as text), infinities, underscores, hex, sexagesimal, YAML 1.1 booleans,
    interpolations and quoted numbers: the fast reader of run folders gives what OmegaConf.load gives."""
    text = (
        "a: 1e-3\nb: 1.5E+4\nc: 2026-11-28\nd: .inf\ne: 1_000\nf: 0x1f\ng: yes\nh: 1e3\ni: -2e-5\nj: '1e-3'\n"
        "k: ${x.y}\nl: [1e-3, 3]\nm: null\nn: 12:30:00\no: 1.e5\np: +1e2\nq: {r: 2.5e-4, s: off}\n"
        "t: 1_e3\nu: 1__0e3\nv: ._e5\nw: [1_e3, .5e-3, 1_000.5]\n"
    )
    file = tmp_path / "config.yaml"
    file.write_text(text)
    expected = OmegaConf.to_container(OmegaConf.load(file))
    assert load_saved_yaml(file) == expected
    assert repr(load_saved_yaml(file)) == repr(expected)  # 1e3 a float there too, not an int equal to it
    assert expected["a"] == 0.001 and expected["c"] == "2026-11-28"


def test_a_damaged_config_is_named_and_the_runs_results_still_shown(tmp_path, capsys):
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 1.9})
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("model: [unclosed")
    [run] = find_runs(tmp_path)
    assert run.config == {} and run.metrics == {"best_val_loss": 1.9}
    assert run.unreadable.startswith(".hydra/config.yaml: ")
    code, out, _ = compare(capsys, str(tmp_path))
    assert code == 0 and "unreadable .hydra/config.yaml: " in out.splitlines()[1]


def test_an_earlier_run_set_aside_in_a_run_folder_is_not_a_run(tmp_path):
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 1.8})
    (tmp_path / "run" / "checkpoints" / "superseded" / "001").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "superseded" / "001" / "metrics.json").write_text('{"best_val_loss": 2.5}')
    make_run(tmp_path / "superseded" / "001", 3e-4, metrics={"best_val_loss": 2.0})  # a sweep job's name, not set aside
    assert [r.name for r in find_runs(tmp_path)] == ["run", "superseded/001"]


def test_a_run_set_aside_in_the_earlier_layout_is_not_a_run_either(tmp_path):
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 1.8})
    (tmp_path / "run" / "checkpoints" / "superseded").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "superseded" / "metrics.json").write_text('{"best_val_loss": 2.5}')
    assert [r.name for r in find_runs(tmp_path)] == ["run"]


def write_checkpoint(folder, iteration: int) -> None:
    """A file with a checkpoint's progress in its metadata (the runs table reads nothing else of it)."""
    folder.mkdir(parents=True, exist_ok=True)
    progress = json.dumps({"iteration": iteration, "best_val_loss": 2.0})
    save_file({"x": torch.zeros(1)}, folder / f"iter_{iteration:06d}.ckpt", metadata={"progress": progress})


def test_a_run_with_checkpoints_but_no_results_is_listed_unfinished_after_the_others(tmp_path, capsys):
    make_run(tmp_path / "done", 1e-3, metrics={"best_val_loss": 1.9})
    make_run(tmp_path / "failed", 3e-2, error="loss became nan at iteration 7")
    make_run(tmp_path / "stopped", 3e-4)
    for iteration in (10, 20):
        write_checkpoint(tmp_path / "stopped" / "checkpoints", iteration)
    write_checkpoint(tmp_path / "killed" / "checkpoints", 5)  # no .hydra: a run of train() from Python
    write_checkpoint(tmp_path / "done" / "checkpoints", 50)  # a finished run's checkpoints: it reads as ok
    write_checkpoint(tmp_path / "done" / "checkpoints" / "superseded" / "001", 30)  # set aside: not a run
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)
    (tmp_path / "other" / "checkpoints" / "iter_final.ckpt").write_text("not a checkpoint name")
    runs = find_runs(tmp_path)
    assert [r.name for r in runs] == ["done", "failed", "killed", "stopped"]
    assert [r.unfinished_at for r in runs] == [None, None, 5, 20]
    code, out, err = compare(capsys, str(tmp_path), "--keys", "optim.lr")
    assert code == 0 and err == ""
    assert [(line.split()[0], line.split("  ")[-1].strip()) for line in out.splitlines()[1:]] == [
        ("done", "ok"),
        ("failed", "failed: loss became nan at iteration 7"),
        ("killed", "unfinished (iter 5)"),
        ("stopped", "unfinished (iter 20)"),
    ]
    # The listing reads the iteration from the name: a damaged newest checkpoint (which resume reports) or one a
    # live run prunes meanwhile does not stop it.
    (tmp_path / "stopped" / "checkpoints" / "iter_000030.ckpt").write_text("damaged")
    assert [r.unfinished_at for r in find_runs(tmp_path)] == [None, None, 5, 30]


def test_a_results_file_without_an_iteration_count_is_read_as_the_newest_checkpoint_s(tmp_path, capsys):
    """`"iters": null` reads like a metrics.json without the key, not as a traceback; a damaged one is named."""
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 1.9, "iters": None})
    write_checkpoint(tmp_path / "run" / "checkpoints", 50)
    assert [(r.unfinished_at, r.metrics["best_val_loss"]) for r in find_runs(tmp_path)] == [(None, 1.9)]
    (tmp_path / "run" / "metrics.json").write_text('{"best_val_loss": 1.9, "iters": "50"}')
    [run] = find_runs(tmp_path)
    assert (run.unreadable, run.metrics) == ('metrics.json: iters="50" is not an iteration count', None)


def test_huge_values_read_as_exponents_and_text_keeps_each_row_on_one_line():
    table = format_table([{"optim.lr": 1e30, "data.separator": "\n\t", "tokens_per_sec": 123456.7}])
    assert table.splitlines()[1].split() == ["1e+30", "\\n\\t", "123,457"]


def test_the_runs_command_shows_a_swept_config_group_and_takes_it_in_keys(tmp_path, capsys):
    for name, preset, ff_dim in (("0", "small", 512), ("1", "medium", 1024)):
        make_run(tmp_path / name, 1e-3, metrics={"best_val_loss": 2.0 + int(name)})
        OmegaConf.save({"model": {"ff_dim": ff_dim}, "optim": {"lr": 1e-3}}, tmp_path / name / ".hydra" / "config.yaml")
        OmegaConf.save([f"model={preset}", "optim.lr=1e-3"], tmp_path / name / ".hydra" / "overrides.yaml")
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a job without a readable config: left out of the comparison
    (tmp_path / "2" / "failed.json").write_text(json.dumps({"error": "boom", "type": "FluxtrainError"}))
    code, out, _ = compare(capsys, str(tmp_path))
    assert code == 0 and out.splitlines()[0].split()[:3] == ["run", "model", "model.ff_dim"]
    assert [line.split()[:3] for line in out.splitlines()[1:3]] == [["0", "small", "512"], ["1", "medium", "1024"]]
    code, out, _ = compare(capsys, str(tmp_path), "--keys", "model")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()] == [
        ["run", "model"], ["0", "small"], ["1", "medium"], ["2", "-"]
    ]  # fmt: skip


def test_a_nan_loss_ranks_after_the_numbers_and_no_number_reads_as_an_exponent(tmp_path, capsys):
    make_run(tmp_path / "a", 1e-3, metrics={"best_val_loss": float("nan"), "tokens_per_sec": 9999.7})
    make_run(tmp_path / "b", 3e-3, metrics={"best_val_loss": 2.5, "tokens_per_sec": 9999.4})
    make_run(tmp_path / "c", 1e-2, metrics={"best_val_loss": 1.5, "tokens_per_sec": 12345.6})
    make_run(tmp_path / "d", 3e-2, error="loss became nan at iteration 7")
    code, out, err = compare(capsys, str(tmp_path))
    assert code == 0 and err == ""
    rows = [line.split()[:5] for line in out.splitlines()[1:]]
    assert rows == [
        ["c", "0.01", "1.5", "-", "12,346"],
        ["b", "0.003", "2.5", "-", "9999"],
        ["a", "0.001", "nan", "-", "10,000"],
        ["d", "0.03", "-", "-", "-"],
    ]


def test_the_best_runs_are_the_finished_ones_best_first_also_with_a_loss_missing(tmp_path):
    """The notebook plots these: a results file without a number for the loss ranks last, as in the table."""
    make_run(tmp_path / "a", 1e-3, metrics={"best_val_loss": None, "final_val_loss": 2.0})
    make_run(tmp_path / "b", 3e-3, metrics={"best_val_loss": 2.5})
    make_run(tmp_path / "c", 1e-2, metrics={"best_val_loss": 1.5})
    make_run(tmp_path / "d", 3e-2, error="loss became nan at iteration 7")
    make_run(tmp_path / "e", 3e-2, metrics={"final_val_loss": 2.0})
    runs = find_runs(tmp_path)
    assert [run.name for run in best_runs(runs)] == ["c", "b", "a", "e"]
    assert [run.name for run in best_runs(runs, 2)] == ["c", "b"]


def test_a_resumed_runs_curves_read_without_tensorboards_out_of_order_warning(tmp_path, caplog, capfd):
    with SummaryWriter(str(tmp_path)) as first:  # a session stopped after its checkpoint at step 2
        for step in (1, 2, 3, 4):
            first.add_scalar("train/loss", 5.0 - step, step)
    time.sleep(1.1)  # event files are named by the second they were opened
    with SummaryWriter(str(tmp_path), purge_step=3) as resumed:
        for step in (3, 4, 5):
            resumed.add_scalar("train/loss", 10.0 - step, step)
    with caplog.at_level(logging.WARNING):
        assert read_scalars(tmp_path, "train/loss") == ([1, 2, 3, 4, 5], [4.0, 3.0, 7.0, 6.0, 5.0])
    assert "out of order" not in caplog.text + capfd.readouterr().err
    assert logging.getLogger("tensorboard").level == logging.NOTSET


def test_runs_of_different_tokenizers_rank_by_bits_per_byte(tmp_path):
    def run(name: str, tokenizer: str, loss: float, bpb: float | None, settings: dict | None = None) -> Run:
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(tokenizer)  # what the run trained with, whatever its settings
        metrics = {"best_val_loss": loss, "final_val_loss": loss, "val_bpb": 2.0}  # the final bpb
        metrics |= {} if bpb is None else {"best_val_bpb": bpb}
        return Run(tmp_path / name, name, settings or {}, [], metrics, None)

    char, bpe = '{"type": "char", "chars": ["a", "b"]}', '{"model": {"type": "BPE"}}'
    runs = [run("char", char, 1.5, 2.2), run("bpe", bpe, 3.9, 2.1), run("char-b", char, 1.6, 2.3)]
    assert [r.name for r in best_runs(runs)] == ["bpe", "char", "char-b"]
    lines = ranked_table(runs, []).splitlines()
    assert lines[0].split()[:3] == ["run", "best_val_bpb", "best_val_loss"]
    assert [line.split()[:2] for line in lines[1:]] == [["bpe", "2.1"], ["char", "2.2"], ["char-b", "2.3"]]
    # One tokenizer, whatever the settings say (init_from keeps a model's): ranked by the loss, without a bpb column.
    same = [runs[2], runs[0], run("said-bpe", char, 1.7, 1.0, {"tokenizer": {"kind": "bpe"}})]
    assert [r.name for r in best_runs(same)] == ["char", "char-b", "said-bpe"]
    assert ranked_table(same, []).splitlines()[0].split()[:2] == ["run", "best_val_loss"]
    # A run from before best_val_bpb was recorded ranks by its final bpb (2.0 here), not last.
    assert [r.name for r in best_runs([runs[0], run("old-bpe", bpe, 3.9, None)])] == ["old-bpe", "char"]


def test_an_empty_keys_option_is_an_error_not_the_default(tmp_path, capsys):
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 1.9})
    code, out, err = compare(capsys, str(tmp_path), "--keys=")
    assert (code, out) == (1, "")
    assert err.startswith("error: --keys is empty: name settings separated by commas") and len(err.splitlines()) == 1


def test_a_config_group_chosen_on_the_command_line_shows_its_option(tmp_path):
    """A swept config group (`model=small,medium`) is a column of option names, not of the group's settings; a
    setting given with `++` shows its value."""
    config = {"model": {"d_model": 128, "n_layers": 2}, "optim": {"lr": 1e-3}}
    overrides = ["model=small", "experiment@_global_=shakespeare_cpu", "++optim.lr=0.003"]
    run = Run(tmp_path, "0", config, overrides, {"best_val_loss": 1.9}, None)
    (row,) = runs_table([run], keys=("model", "experiment", "optim.lr", "train.seed"), metrics=())
    assert row == {
        "run": "0",
        "model": "small",
        "experiment": "shakespeare_cpu",
        "optim.lr": 1e-3,
        "train.seed": None,
        "status": "ok",
    }
    # A setting set to null shows as null, not as the text of its override.
    null_setting = Run(tmp_path, "1", {"train": {"max_time": None}}, ["train.max_time=null"], None, None)
    assert runs_table([null_setting], keys=("train.max_time",), metrics=())[0]["train.max_time"] is None


@pytest.mark.parametrize(
    "train_settings, status",
    [
        ({"max_iters": 1000, "max_time": None}, "unfinished (iter 200)"),  # resumed to train on: not ended yet
        ({"max_iters": 200, "max_time": None}, "ok"),
        ({"max_iters": 100, "max_time": None}, "ok"),  # resumed past its max_iters: evaluated only
        ({"max_iters": 1000, "max_time": 60.0}, "ok"),  # a time budget ends a run before its max_iters
    ],
)
def test_a_finished_run_resumed_to_train_longer_reads_as_unfinished(tmp_path, train_settings, status):
    """A finished run resumed with a larger train.max_iters keeps its results of iteration 200 until it ends: while
    it trains towards its first checkpoint, or once killed before it, they are not the run's (its saved config
    asks for more iterations)."""
    make_run(tmp_path / "run", 1e-3, metrics={"best_val_loss": 1.9, "iters": 200})
    config = OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    config.train = train_settings
    OmegaConf.save(config, tmp_path / "run" / ".hydra" / "config.yaml")
    write_checkpoint(tmp_path / "run" / "checkpoints", 200)
    (run,) = find_runs(tmp_path)
    assert runs_table([run], keys=())[0]["status"] == status


def test_one_key_given_as_text_is_one_column(tmp_path):
    make_run(tmp_path / "a", 1e-3, metrics={"best_val_loss": 1.9})
    (row,) = runs_table(find_runs(tmp_path), keys="optim.lr", metrics="best_val_loss")
    assert row == {"run": "a", "optim.lr": 1e-3, "best_val_loss": 1.9, "status": "ok"}


def test_a_run_folder_named_as_dot_is_listed_under_its_own_name(tmp_path, monkeypatch):
    make_run(tmp_path / "7", 1e-3, metrics={"best_val_loss": 1.9})
    monkeypatch.chdir(tmp_path / "7")
    assert [r.name for r in find_runs(tmp_path / "7" / ".")] == ["7"]
    assert [r.name for r in find_runs(Path("."))] == ["7"]


def test_a_run_started_from_a_model_file_shows_its_tokenizer_settings_as_the_models(tmp_path):
    """`init_from` keeps the model file's tokenizer, so the run's `tokenizer` settings did not train it."""
    settings = {"tokenizer": {"kind": "char", "vocab_size": 512}, "optim": {"lr": 1e-3}}
    fine_tuned = Run(tmp_path, "ft", settings | {"init_from": "m.safetensors"}, ["tokenizer=char"], None, None)
    bpe = settings | {"init_from": "m.safetensors", "tokenizer": {"kind": "bpe"}}
    other = Run(tmp_path, "ft2", bpe, [], None, None)
    fresh = Run(tmp_path, "fresh", settings | {"init_from": None}, ["tokenizer=char"], None, None)
    keys = ("tokenizer", "tokenizer.kind", "tokenizer.vocab_size", "optim.lr")
    rows = runs_table([fine_tuned, fresh], keys=keys, metrics=())
    assert [row["tokenizer.kind"] for row in rows] == ["from init_from", "char"]
    assert [row["tokenizer"] for row in rows] == ["from init_from", "char"]
    assert [row["optim.lr"] for row in rows] == [1e-3, 1e-3]
    # Two fine-tuning runs of one model differ in no tokenizer column, whatever their settings say.
    assert varying_keys([fine_tuned, other]) == []
    assert "tokenizer.kind" in varying_keys([fine_tuned, fresh])
