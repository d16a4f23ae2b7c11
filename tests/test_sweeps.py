"""Hydra sweeps: complete job folders with metrics.json and HParams events, the return value, a failing job, Optuna."""

from __future__ import annotations

import copy
import json
import math
import os
import signal

import pytest
import yaml
from google.protobuf import json_format
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups
from tensorboard.plugins.hparams import metadata as hparams_metadata

from fluxtrain.__main__ import main
from fluxtrain.errors import FluxtrainError
from fluxtrain.hparams import METRIC_PREFIX
from fluxtrain.interrupt import TrainingInterrupted
from fluxtrain.resume import resume_command
from fluxtrain.runs import Run, ranked_table
from fluxtrain.sweep import (
    FAILED_FILE,
    FAILED_VALUE,
    failed_jobs,
    failure_summary,
    sweep_jobs,
    swept_keys,
    swept_values,
)
from fluxtrain.tasks import TASKS

from .conftest import REPO_ROOT, TINY_OVERRIDES, compose_config, run_fluxtrain, tiny_except

REPORTED = ("final_train_loss", "final_val_loss", "best_val_loss", "val_perplexity", "tokens_per_sec", "wall_time_sec")
SHORT = ["train.max_iters=20", "train.eval_interval=10"]
# The columns of the results table after the swept settings.
RESULT_COLUMNS = ["best_val_loss", "final_val_loss", "tokens_per_sec", "wall_time_sec", "status"]


def printed_results(stdout: str) -> list[list[str]]:
    """The rows of the results table a sweep prints when it ends, split into cells (header first)."""
    lines = stdout.split("sweep results, best first")[1].split("\n\n")[0].splitlines()[1:]
    return [line.split(maxsplit=5) for line in lines]


def read_hparams(run_dir):
    """(hyper-parameters, metric tags of the experiment, last value of each scalar) from a run's event file."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    end = hparams_metadata.parse_session_end_info_plugin_data(content[hparams_metadata.SESSION_END_INFO_TAG])
    assert end.status == 1  # STATUS_SUCCESS
    hparams = {k: v.number_value if v.HasField("number_value") else v.string_value for k, v in start.hparams.items()}
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    return hparams, metric_tags, last


def hparams_table(logdir) -> dict[str, tuple[dict, dict]]:
    """The HParams plugin's table for `logdir`, as TensorBoard serves it: run -> (hyper-parameters, metrics)."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    backend = backend_context.Context(
        base_plugin.TBContext(logdir=str(logdir), multiplexer=mux, data_provider=provider)
    )
    request = json_format.ParseDict(
        {"allowedStatuses": ["STATUS_SUCCESS"], "colParams": [{"hparam": "optim.lr"}], "sliceSize": 100},
        api_pb2.ListSessionGroupsRequest(),
    )
    response = list_session_groups.Handler(context.RequestContext(), backend, "", request).run()
    table = {}
    for group in response.session_groups:
        hparams = {
            k: v.number_value if v.HasField("number_value") else v.string_value for k, v in group.hparams.items()
        }
        table[group.name] = (hparams, {m.name.tag: m.value for m in group.metric_values})
    return table


@pytest.mark.slow
def test_multirun_writes_complete_job_folders_and_hparams(tiny_text_file, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_fluxtrain(
        "-m",
        *tiny_except("optim.lr"),
        *SHORT,
        "optim.lr=1e-3,3e-3",
        "model.dropout=0.0,0.1",
        f"data.path={tiny_text_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        for key in REPORTED:
            assert math.isfinite(metrics[key]) and metrics[key] > 0, (job, key)
        for name in ("model_final.safetensors", "best.safetensors", "tokenizer.json", ".hydra/config.yaml"):
            assert (job / name).is_file(), (job, name)
        hparams, metric_tags, last = read_hparams(job)
        # Every config leaf is a hyper-parameter; the swept values are those of this job's overrides.
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra/overrides.yaml").read_text()))
        assert hparams["optim.lr"] == pytest.approx(float(overrides["optim.lr"]))
        assert hparams["model.dropout"] == pytest.approx(float(overrides["model.dropout"]))
        assert hparams["model.d_model"] == 32 and hparams["tokenizer.kind"] == "char"
        seen.add((hparams["optim.lr"], hparams["model.dropout"]))
        # The HParams table's metric columns are scalars of the same run holding the metrics.json figures.
        assert {METRIC_PREFIX + k for k in REPORTED} <= metric_tags
        for tag in metric_tags:
            assert last[tag] == pytest.approx(metrics[tag.removeprefix(METRIC_PREFIX)], rel=1e-5), tag
        assert "train/loss" in last and "val/loss" in last  # the curves sit next to the HParams row
    assert seen == {(lr, d) for lr in (1e-3, 3e-3) for d in (0.0, 0.1)}

    # `tensorboard --logdir <sweep>` shows the four jobs as rows of one HParams table, with their metrics.
    table = hparams_table(sweep)
    assert sorted(table) == ["0", "1", "2", "3"]
    for name, (hparams, metrics) in table.items():
        saved = json.loads((sweep / name / "metrics.json").read_text())
        assert hparams == read_hparams(sweep / name)[0]
        for key in REPORTED:
            assert metrics[METRIC_PREFIX + key] == pytest.approx(saved[key], rel=1e-5), (name, key)

    # When the sweep ends, it prints one row per job: the swept values and the results, lowest best val loss first.
    header, *rows = printed_results(proc.stdout)
    assert header[:5] + header[5].split() == ["run", "model.dropout", "optim.lr", *RESULT_COLUMNS]
    best = {job.name: json.loads((job / "metrics.json").read_text())["best_val_loss"] for job in jobs}
    assert [row[0] for row in rows] == sorted(best, key=best.get)
    for row in rows:
        assert float(row[3]) == pytest.approx(best[row[0]], rel=1e-3) and row[5].endswith("ok")


@pytest.fixture
def job_config():
    """Make a job's config with Hydra's runtime set as in a real job, to call the `@hydra.main` function directly."""

    def make(overrides: list[str], output_dir, mode: RunMode, job_num: int = 0):
        with_hydra = compose_config(overrides, return_hydra_config=True)
        with open_dict(with_hydra):
            with_hydra.hydra.runtime.output_dir = str(output_dir)
            with_hydra.hydra.mode = mode
            with_hydra.hydra.job.num = job_num
            with_hydra.hydra.overrides.task = overrides
        HydraConfig.instance().set_config(with_hydra)
        cfg = copy.deepcopy(with_hydra)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def test_main_returns_best_val_loss(job_config, tiny_text_file, tmp_path):
    overrides = [*TINY_OVERRIDES, *SHORT, f"data.path={tiny_text_file}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = job_config(overrides, tmp_path / "run", RunMode.RUN)
    value = main(cfg)
    assert value == json.loads((tmp_path / "run" / "metrics.json").read_text())["best_val_loss"]


def test_failing_job_in_multirun_mode_is_recorded_not_raised(job_config, tiny_text_file, tmp_path):
    overrides = [*tiny_except("model.n_heads"), "model.n_heads=3", f"data.path={tiny_text_file}"]
    cfg = job_config(overrides, tmp_path / "job", RunMode.MULTIRUN)
    assert main(cfg) == FAILED_VALUE
    report = json.loads((tmp_path / "job" / FAILED_FILE).read_text())
    assert report["error"] == "model.n_heads=3 must divide model.d_model=32"
    assert report["type"] == "FluxtrainError" and "model.n_heads=3" in report["overrides"]


def test_interrupted_job_stops_the_whole_sweep(job_config, tmp_path, monkeypatch):
    def stopped(cfg, run_dir):
        raise TrainingInterrupted("stopped by SIGTERM; checkpoint ckpt.pt", signal.SIGTERM)

    monkeypatch.setitem(TASKS, "train", stopped)
    cfg = job_config(TINY_OVERRIDES, tmp_path / "job", RunMode.MULTIRUN)
    with pytest.raises(SystemExit) as e:  # not caught by Hydra's job runner, so no later job starts
        main(cfg)
    assert e.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "job" / FAILED_FILE).exists()


def test_a_stopped_sweep_job_points_to_resuming_the_whole_sweep(job_config, tmp_path):
    job_config([*TINY_OVERRIDES, f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path / "sweep" / "0", RunMode.MULTIRUN)
    expected = f"the sweep's own command (with -m) plus hydra.sweep.dir={tmp_path / 'sweep'} resume=auto"
    assert resume_command(tmp_path / "sweep" / "0") == expected
    job_config(TINY_OVERRIDES, tmp_path / "run", RunMode.RUN)
    assert resume_command(tmp_path / "run").startswith("python -m fluxtrain model.d_model=32 ")


def test_a_job_given_an_earlier_jobs_folder_is_refused_before_it_touches_it(job_config, tmp_path, monkeypatch, capsys):
    """A constant `hydra.sweep.subdir` interpolation gives every job one folder: the second job stops the sweep
    in one line, and the first job's failure report and Hydra config files stay as that job left them."""
    from fluxtrain.sweep import SweepReport

    def failing(cfg, run_dir):
        raise FluxtrainError("job 0 failed")

    monkeypatch.setitem(TASKS, "train", failing)
    SweepReport().on_multirun_start(OmegaConf.create())  # a new sweep in this process
    job = tmp_path / "sweep" / "train"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.001\n")  # as Hydra saves it before the job
    assert main(job_config(TINY_OVERRIDES, job, RunMode.MULTIRUN)) == FAILED_VALUE
    (job / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.003\n")  # Hydra, for the next job
    with pytest.raises(SystemExit) as e:  # not caught by Hydra's job runner, so no later job starts
        main(job_config(TINY_OVERRIDES, job, RunMode.MULTIRUN, job_num=1))
    assert e.value.code == 1
    assert capsys.readouterr().err == (
        f"error: hydra.sweep.subdir gives job 1 the folder {job} of job 0 of this sweep, whose results it would set "
        "aside; use an interpolation that differs between jobs, e.g. hydra.sweep.subdir='${hydra.job.num}' (the "
        "default)\n"
    )
    assert json.loads((job / FAILED_FILE).read_text())["error"] == "job 0 failed"
    assert (job / ".hydra" / "overrides.yaml").read_text() == "- optim.lr=0.001\n"


@pytest.mark.slow
def test_a_constant_sweep_subdir_interpolation_stops_the_sweep_at_its_second_job(tiny_text_file, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_fluxtrain(
        "-m",
        *tiny_except("optim.lr"),
        *SHORT,
        "optim.lr=1e-3,2e-3,3e-3",
        "hydra.sweep.subdir=${hydra.job.name}",
        f"data.path={tiny_text_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(
        f"error: hydra.sweep.subdir gives job 1 the folder {sweep / 'train'} of job 0 of this sweep"
    )
    assert "Traceback" not in proc.stderr + proc.stdout and "#2 :" not in proc.stdout  # the third job never ran
    job = sweep / "train"  # job 0's, as it left it: its overrides, results and log, and nothing set aside
    assert "optim.lr=0.001" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    assert json.loads((job / "metrics.json").read_text())["iters"] == 20
    assert not (job / "checkpoints" / "superseded").exists() and not (job / FAILED_FILE).exists()
    assert "error" not in (job / "train.log").read_text()


@pytest.mark.slow
def test_failing_job_does_not_hide_the_other_results(tiny_text_file, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_fluxtrain(
        "-m",
        *tiny_except("model.n_heads"),
        *SHORT,
        "model.n_heads=3,2",
        f"data.path={tiny_text_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 1
    # The bad value fails with a one-line reason in its folder and no results there...
    failed = json.loads((sweep / "0" / FAILED_FILE).read_text())
    assert failed["error"] == "model.n_heads=3 must divide model.d_model=32"
    assert not (sweep / "0" / "metrics.json").exists()
    # ...the other job ran to the end...
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert metrics["iters"] == 20 and math.isfinite(metrics["best_val_loss"])
    assert not (sweep / "1" / FAILED_FILE).exists()
    read_hparams(sweep / "1")
    # ...and the end-of-sweep report names the failed job by its swept value, without a traceback.
    assert "1 of 2 sweep job(s) failed; the others finished (see failed.json" in proc.stderr
    assert f"{sweep / '0'}: model.n_heads=3: model.n_heads=3 must divide model.d_model=32" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    _, finished, failed_row = printed_results(proc.stdout)  # the finished job first, the failed one last
    assert finished[:2] == ["1", "2"] and finished[5].endswith("ok")
    assert failed_row[:4] == ["0", "3", "-", "-"] and failed_row[5].endswith(
        "failed: model.n_heads=3 must divide model.d_model=32"
    )


def test_optuna_search_composes():
    cfg = compose_config(["hparams_search=lr_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.direction == "minimize"  # main returns the best val loss; failed jobs return +inf
    assert set(sweeper.params) == {"optim.lr", "model.dropout"}
    assert sweeper.params["optim.lr"] == "tag(log, interval(1e-4, 1e-2))"
    assert 0 < sweeper.n_trials <= 20 and cfg.train.max_iters <= 1000  # a small budget
    assert cfg.model.d_model == compose_config([]).model.d_model  # the search leaves the preset alone


def test_optuna_search_composes_with_every_experiment():
    experiments = sorted((REPO_ROOT / "conf" / "experiment").glob("*.yaml"))
    if not experiments:
        pytest.skip("no experiment files")
    for path in experiments:
        alone = compose_config([f"experiment={path.stem}"])
        cfg = compose_config([f"experiment={path.stem}", "hparams_search=lr_optuna"], return_hydra_config=True)
        assert get_class(cfg.hydra.sweeper._target_).__name__ == "OptunaSweeper", path.stem
        assert cfg.model == alone.model and cfg.optim == alone.optim  # the search starts from the experiment
        assert cfg.train.max_iters == 1000


@pytest.mark.slow
def test_optuna_sweep_of_two_trials_runs(tiny_text_file, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_fluxtrain(
        "-m",
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=2",
        *tiny_except("optim.lr"),
        *SHORT,
        f"data.path={tiny_text_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best_losses = []
    for job in ("0", "1"):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((sweep / job / ".hydra/overrides.yaml").read_text()))
        assert 1e-4 <= float(overrides["optim.lr"]) <= 1e-2
        assert 0.0 <= float(overrides["model.dropout"]) <= 0.3
        best_losses.append(json.loads((sweep / job / "metrics.json").read_text())["best_val_loss"])
    # The sweeper saw the values `main` returned: its best is the lower best val loss of the two trials.
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(best_losses))
    assert f"Best value: {results['best_value']}" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_optuna_sweep_survives_failing_trials(tiny_text_file, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_fluxtrain(
        "-m",
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=2",
        *tiny_except("model.n_heads"),
        "model.n_heads=3",
        f"data.path={tiny_text_file}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={sweep}",
    )
    # Both trials fail; the study still ends (failed trials count as +inf) and the report lists them.
    assert proc.returncode == 1
    # With no finished trial there is no best: the sweeper's results (best_value .inf) would name a failed one.
    assert not (sweep / "optimization_results.yaml").exists()
    assert "no trial finished, so there is no best: optimization_results.yaml was removed" in proc.stderr
    assert "Best value" not in proc.stdout + proc.stderr and "Best parameters" not in proc.stdout + proc.stderr
    assert "2 of 2 sweep job(s) failed (see failed.json" in proc.stderr
    for job in ("0", "1"):
        assert json.loads((sweep / job / FAILED_FILE).read_text())["error"].startswith("model.n_heads=3 must divide")


def test_failed_jobs_are_listed_by_job_number_and_only_from_this_sweep(tmp_path):
    for job in ("0", "2", "10", "1", "3"):
        (tmp_path / job).mkdir()
        (tmp_path / job / FAILED_FILE).write_text(json.dumps({"error": f"job {job}", "overrides": []}))
    os.utime(tmp_path / "3" / FAILED_FILE, (1_000_000, 1_000_000))  # left by an earlier sweep into this folder
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / FAILED_FILE).write_text('{"error": "job 4", "over')  # half-written by another process
    found = failed_jobs(tmp_path, since=2_000_000)
    assert [(path.name, error) for path, error, _ in found] == [
        ("0", "job 0"),
        ("1", "job 1"),
        ("2", "job 2"),
        ("4", "failed.json unreadable: Unterminated string starting at: line 1 column 20 (char 19)"),
        ("10", "job 10"),
    ]


def test_a_failed_job_shows_its_swept_settings_or_every_override_as_written():
    assert swept_values(["model=small", "optim.lr=0.1", "+x=1"], {"optim.lr"}) == "optim.lr=0.1"
    assert swept_values(["model=small"], {"optim.lr"}) == "model=small"  # none swept: all of them
    assert swept_values(["model.n_heads=(3", "optim.lr=0.1"], {"optim.lr"}) == "model.n_heads=(3 optim.lr=0.1"
    nested = "model.n_heads=" + "[" * 500 + "]" * 500  # past the parser's recursion limit
    assert swept_values([nested], {"model.n_heads"}) == nested


def test_the_failure_summary_counts_every_task_s_jobs_from_this_sweep(tmp_path):
    """lr_find jobs write no metrics.json: the jobs are counted by the config Hydra saves in each job folder."""
    for job in ("0", "1", "2"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "config.yaml").write_text("task: lr_find\n")
    (tmp_path / "1" / "lr_find.json").write_text("{}")
    os.utime(tmp_path / "2" / ".hydra" / "config.yaml", (1_000_000, 1_000_000))  # an earlier sweep's job
    assert failure_summary(1, tmp_path, 2_000_000, ".hydra") == "1 of 2 sweep job(s) failed; the others finished"
    assert failure_summary(2, tmp_path, 2_000_000, ".hydra") == "2 of 2 sweep job(s) failed"
    assert failure_summary(1, tmp_path, 2_000_000, None) == "1 sweep job(s) failed"


def test_the_results_table_lists_this_sweeps_jobs_best_first(tmp_path):
    def job(name: str, lr: float, best: float | None, mtime: float = 3_000_000) -> Run:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        saved = tmp_path / name / ".hydra" / "config.yaml"
        saved.write_text(f"optim:\n  lr: {lr}\n")
        os.utime(saved, (mtime, mtime))
        metrics = None if best is None else {"best_val_loss": best, "final_val_loss": best + 0.01}
        return Run(tmp_path / name, name, {"optim": {"lr": lr}}, [f"optim.lr={lr}"], metrics, None)

    runs = [job("0", 1e-3, 2.5), job("1", 1e-2, None), job("2", 3e-3, 2.25), job("10", 3e-4, 2.75)]
    job("3", 1e-4, 1.0, mtime=1_000_000)  # an earlier sweep's job in the same folder
    assert [p.name for p in sweep_jobs(tmp_path, 2_000_000, ".hydra")] == ["0", "1", "2", "10"]
    # Without Hydra's output subfolder, the jobs are those that wrote their metrics or their failure.
    (tmp_path / "10" / "metrics.json").write_text("{}")
    (tmp_path / "2" / FAILED_FILE).write_text("{}")
    (tmp_path / "3" / "metrics.json").write_text("{}")
    os.utime(tmp_path / "3" / "metrics.json", (1_000_000, 1_000_000))
    assert [p.name for p in sweep_jobs(tmp_path, 2_000_000, None)] == ["2", "10"]
    lines = ranked_table(runs, ["optim.lr"]).splitlines()
    assert lines[0].split() == ["run", "optim.lr", *RESULT_COLUMNS]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["2", "0.003", "2.25"],
        ["0", "0.001", "2.5"],
        ["10", "0.0003", "2.75"],
        ["1", "0.01", "-"],
    ]


def test_swept_keys_are_the_settings_and_groups_without_hydra_s_prefixes():
    """`++optim.lr=1e-3,3e-3` sweeps optim.lr, `model=small,medium` the model group: the results table's columns,
    which name the settings the jobs' configs hold and the options the jobs chose."""
    task = ["++optim.lr=1e-3,3e-3", "model=small,medium", "train.max_iters=20", "+model@extra=a,b"]
    config = OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": {"params": {"model.dropout": "x"}}}})
    assert swept_keys(config) == {"optim.lr", "model", "model.dropout"}
