"""Sweeps: a failing job is recorded in its folder and skipped; when the sweep ends, its jobs' results are listed,
best first, and the failures reported."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fluxtrain.errors import FluxtrainError, first_line, is_out_of_memory, out_of_memory_message
from fluxtrain.files import atomic_write_text
from fluxtrain.interrupt import TrainingInterrupted
from fluxtrain.run_folder import FolderInUse, hydra_files, put_back_hydra_files
from fluxtrain.runs import FAILED_FILE, load_failure, ranked_table, read_run, run_folders, written_since

log = logging.getLogger("fluxtrain")

# What a failed job returns to the sweeper: the worst value when minimising (Optuna rejects NaN as a trial value).
FAILED_VALUE = math.inf
SEARCH_RESULTS_FILE = "optimization_results.yaml"  # the Optuna sweeper's best_params and best_value


class FolderOfAnEarlierJob(FluxtrainError):
    """A job of a sweep got the folder of an earlier job of the same sweep (a `hydra.sweep.subdir` the same for
    every job); it would set that job's results aside."""


# The job folders this process's sweep has used: folder -> (job number, the Hydra config files the job saved there).
# The basic launcher runs a sweep's jobs (the Optuna sweeper's trials too) in this process; submitit's jobs run in
# processes of their own, which this check does not see.
_job_folders: dict[Path, tuple[int, dict[str, bytes]]] = {}
_finished_jobs: set[int] = set()  # the job numbers among them that finished

OPTUNA_LOGGER = "hydra_plugins.hydra_optuna_sweeper._impl"


class NoBestWithoutAFinishedTrial(logging.Filter):
    """Leaves out the Optuna sweeper's "Best parameters" and "Best value" lines when every trial of a sweep run in
    this process failed: they would name a failed trial, with the value .inf. (Where jobs run in processes of their
    own, this process has not seen them, and the lines stay.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if _job_folders and not _finished_jobs:
            return not str(record.msg).startswith(("Best parameters:", "Best value:"))
        return True


def claim_job_folder(run_dir: Path, job: int) -> None:
    """Refuse job number `job` in `run_dir` where an earlier job of this sweep ran, before it writes there: the sweep
    stops with one line, and the Hydra config files Hydra replaced there go back to the earlier job's."""
    folder = run_dir.resolve()
    if folder not in _job_folders:
        _job_folders[folder] = (job, hydra_files(folder))
        return
    earlier, saved = _job_folders[folder]
    put_back_hydra_files(folder, saved)
    error = FolderOfAnEarlierJob(
        f"hydra.sweep.subdir gives job {job} the folder {run_dir} of job {earlier} of this sweep, whose results it "
        "would set aside; use an interpolation that differs between jobs, e.g. hydra.sweep.subdir='${hydra.job.num}' "
        "(the default)"
    )
    print(f"error: {error}", file=sys.stderr)  # not logged: the log file there is the earlier job's
    error.reported = True
    raise error


def run_sweep_job(task: Callable[[], float], run_dir: Path, overrides: list[str], job: int) -> float:
    """Run job number `job` of a sweep; on an error, log it, write `failed.json` into `run_dir` and return
    FAILED_VALUE. A job given the folder of an earlier one is refused, and ends the sweep (`claim_job_folder`).

    An exception would end the sweep with only the first error's traceback (Hydra's basic sweeper after its batch,
    the Optuna sweeper at once) and skip the end-of-sweep report; caught here, every job runs and is reported.
    """
    claim_job_folder(run_dir, job)
    failed_file = run_dir / FAILED_FILE
    failed_file.unlink(missing_ok=True)  # left by an earlier sweep into the same folder
    try:
        value = task()
        _finished_jobs.add(job)
        return value
    except (TrainingInterrupted, FolderInUse):
        raise  # a stop on SIGINT/SIGTERM ends the whole sweep, as it ends a single run; so does a sweep already there
    except Exception as e:
        if isinstance(e, FluxtrainError):
            log.error(f"error: {e}")
        elif is_out_of_memory(e):
            log.error(f"error: {out_of_memory_message(e)}")
        else:
            log.exception(f"job failed with {type(e).__name__}")
        report = {"error": str(e).splitlines()[0] if str(e) else "", "type": type(e).__name__, "overrides": overrides}
        atomic_write_text(failed_file, json.dumps(report, indent=2) + "\n")
        return FAILED_VALUE


def failed_jobs(sweep_dir: Path, since: float = 0.0) -> list[tuple[Path, str, list[str]]]:
    """(job folder, error message, overrides) of every job under `sweep_dir` that failed at or after time `since`."""
    failed = []
    for path in written_since(sweep_dir, FAILED_FILE, since):
        try:
            error, overrides = load_failure(path)
        except (OSError, ValueError) as e:  # another process's file, half-written or edited
            error, overrides = f"{FAILED_FILE} unreadable: {first_line(e)}", None
        failed.append((path.parent, error, overrides or []))
    return failed


def swept_values(overrides: list[str], swept: set[str]) -> str:
    """The swept settings among a job's overrides (`optim.lr=0.1`), or all of them as written where there are none
    or one does not parse (a failed.json edited by hand)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except (HydraException, RecursionError):  # RecursionError: brackets nested past Python's limit
        return " ".join(overrides)
    return " ".join([o.input_line for o in parsed if o.key_or_group in swept] or overrides)


def failure_summary(n_failed: int, sweep_dir: Path, since: float, output_subdir: str | None) -> str:
    """The line "N of M sweep job(s) failed": M counts the job folders where Hydra saved a config since `since`, so
    every task's jobs count; without a Hydra output subfolder, M is unknown and left out."""
    if not output_subdir:
        return f"{n_failed} sweep job(s) failed"
    n_jobs = max(len(written_since(sweep_dir, f"{output_subdir}/config.yaml", since)), n_failed)
    outcome = f"{n_failed} of {n_jobs} sweep job(s) failed"
    return outcome + ("; the others finished" if n_jobs > n_failed else "")


def sweep_jobs(sweep_dir: Path, since: float, output_subdir: str | None) -> list[Path]:
    """The job folders of the sweep that started at time `since`: where Hydra saved a job config since then, or
    without a Hydra output subfolder, where a job wrote its metrics or failure since then."""
    if output_subdir:
        return [p.parent.parent for p in written_since(sweep_dir, f"{output_subdir}/config.yaml", since)]
    return run_folders(sweep_dir, since)


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a multirun varies: sweep overrides (`a=1,2`, `++a=1,2`, `model=small,medium`) and the sweeper's own
    search space (Optuna's params), without Hydra's `+`/`++` prefixes and `@package` suffixes."""
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = {o.key_or_group for o in overrides if o.is_sweep_override()}
    return keys | set(config.hydra.sweeper.get("params") or {})


def drop_search_results_without_a_best(sweep_dir: Path, since: float) -> bool:
    """Remove the search results this sweep wrote when every trial failed: their best_params would name a failed
    trial, with best_value .inf. Whether it removed them."""
    results = sweep_dir / SEARCH_RESULTS_FILE
    try:
        if results.stat().st_mtime < since:  # an earlier search's
            return False
        content = yaml.safe_load(results.read_text())
    except (OSError, yaml.YAMLError):  # none: no search, or not one that writes them
        return False
    if not isinstance(content, dict) or content.get("best_value") != FAILED_VALUE:
        return False
    results.unlink()
    return True


class SweepReport(Callback):
    """When a multirun ends: prints its jobs' results, best first, lists the failed jobs and exits non-zero if there
    were any (configured in conf/hydra/)."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times can be coarser than the clock
        _job_folders.clear()  # a new sweep
        _finished_jobs.clear()
        optuna_log = logging.getLogger(OPTUNA_LOGGER)
        if not any(isinstance(f, NoBestWithoutAFinishedTrial) for f in optuna_log.filters):
            optuna_log.addFilter(NoBestWithoutAFinishedTrial())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        swept = swept_keys(config)
        runs = [read_run(job, sweep_dir) for job in sweep_jobs(sweep_dir, self.started, config.hydra.output_subdir)]
        if any(run.metrics for run in runs):  # training jobs (lr_find jobs write their own results)
            print(f"\nsweep results, best first ({sweep_dir}):\n{ranked_table(runs, sorted(swept))}\n")
        failed = failed_jobs(sweep_dir, self.started)
        if not failed:
            return
        outcome = failure_summary(len(failed), sweep_dir, self.started, config.hydra.output_subdir)
        lines = [f"{outcome} (see {FAILED_FILE} in the job folders):"]
        for job_dir, error, overrides in failed:
            lines.append(f"  {job_dir}: {swept_values(overrides, swept)}: {error}")
        if drop_search_results_without_a_best(sweep_dir, self.started):
            lines.append(f"no trial finished, so there is no best: {SEARCH_RESULTS_FILE} was removed")
        print("\n".join(lines), file=sys.stderr)
        sys.exit(1)
