"""Checks of Hydra's own settings on the command line (`hydra.*`, a launcher), before Hydra runs: values Hydra,
the Optuna sweeper or a launcher would take with a traceback, several lines, or silently do the wrong thing with."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from fluxtrain.errors import FluxtrainError, did_you_mean, first_line
from fluxtrain.overrides import override_key


def check_hydra_setting(arg: str, key: str, values: list[Any]) -> None:
    """`hydra.run.dir` and `hydra.sweep.dir` name a folder: empty, Hydra would write into the working folder. A run
    reads its paths (`data.path`, `resume`, ...) from the working folder, which `hydra.job.chdir=true` would change."""
    if key == "hydra.job.chdir" and any(value is True for value in values):
        raise FluxtrainError(
            f"{arg} is not supported: a run reads data.path, resume and tokenizer.path from the folder it starts in "
            "and writes into hydra.run.dir without changing into it"
        )
    if key == "hydra.sweeper.n_trials" and any(
        isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values
    ):
        raise FluxtrainError(f"{arg}: a search runs at least one trial (hydra.sweeper.n_trials >= 1)")
    if key == "hydra.sweeper.n_jobs" and any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values):
        raise FluxtrainError(f"{arg}: a search asks for at least one trial at a time (hydra.sweeper.n_jobs >= 1)")
    if key == "hydra.sweeper.max_failure_rate" and any(
        isinstance(v, int | float) and not isinstance(v, bool) and not 0 <= v <= 1 for v in values
    ):
        raise FluxtrainError(f"{arg}: the share of failed trials a search allows is from 0 to 1")
    if key == "hydra.sweeper.direction":
        _check_search_direction(arg, values)
    if key == "hydra.sweep.subdir":
        _check_sweep_subdir(arg, values)
    if key not in ("hydra.run.dir", "hydra.sweep.dir"):
        return
    for value in values:
        if not isinstance(value, str):
            raise FluxtrainError(f"{arg} is not a folder; give a path ({key}=. for the working folder)")
        if not value.strip():
            raise FluxtrainError(f"{arg} is empty; give a folder ({key}=. for the working folder)")


def hydra_settings_schema(args: list[str]) -> DictConfig:
    """Hydra's own settings, typed as Hydra types them (`HydraConf`); for a search (`hparams_search=` or
    `hydra/sweeper=optuna` on the command line) `hydra.sweeper` is the Optuna sweeper's, with the sampler the command
    line chooses (`hydra/sweeper/sampler=...`; TPE, as conf/hparams_search/ does, without one)."""
    from hydra.conf import HydraConf

    schema = OmegaConf.structured(HydraConf)
    groups = {override_key(arg.partition("=")[0]): arg.partition("=")[2] for arg in args}
    if "hparams_search" not in groups and groups.get("hydra/sweeper") != "optuna":
        return schema
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf

        schema.sweeper = OmegaConf.structured(OptunaSweeperConf)
        sampler = groups.get("hydra/sweeper/sampler", "tpe")
        schema.sweeper.sampler = ConfigStore.instance().load(f"hydra/sweeper/sampler/{sampler}.yaml").node
    except (ImportError, HydraException):  # no Optuna sweeper (Hydra names the missing option), or no such sampler
        pass
    return schema


def hydra_type_problem(key: str, value: Any, schema: DictConfig) -> str | None:
    """Why `value` does not fit Hydra's own setting `key` (a text for an integer, say), or None. A key the schema
    lacks is left to Hydra: the sweeper's `params` and a launcher's settings are open."""
    if isinstance(value, str) and "${" in value:
        return None
    try:
        OmegaConf.update(schema.copy(), key.removeprefix("hydra."), value, merge=True)
    except ValidationError as e:
        return first_line(e)
    except Exception:  # an unknown key, or one of an open dict that is not set yet
        return None
    return None


def _check_search_direction(arg: str, values: list[Any]) -> None:
    """The Optuna sweeper's `direction`: minimize or maximize, also as a list of one. A trial returns one value (the
    best validation loss), so a list of several, for a study of several objectives, would fail every trial."""
    for value in values:
        if isinstance(value, list) and len(value) > 1:
            raise FluxtrainError(
                f"{arg}: a trial returns one value, its best validation loss, so a search has one direction: minimize "
                "or maximize"
            )
        direction = value[0] if isinstance(value, list) and value else value
        if direction not in ("minimize", "maximize"):
            hint = did_you_mean(direction, ["minimize", "maximize"])
            raise FluxtrainError(f"{arg}: a search's direction is minimize or maximize{hint}")


def _check_sweep_subdir(arg: str, values: list[Any]) -> None:
    """`hydra.sweep.subdir` names each job's folder in the sweep folder: an interpolation that differs between jobs.
    A constant interpolation (`${hydra.job.name}`) is refused once a second job gets the first one's folder
    (`fluxtrain.sweep.claim_job_folder`)."""
    hint = "use an interpolation that differs between jobs, e.g. hydra.sweep.subdir='${hydra.job.num}' (the default)"
    for value in values:
        if value is None:
            raise FluxtrainError(f"{arg}: each job of a sweep needs a folder of its own; {hint}")
        if isinstance(value, str | int | float) and "${" not in str(value):  # bool is an int
            raise FluxtrainError(
                f"{arg} names one folder for every job, so each job would set the one before aside; {hint}"
            )


SLURM_LAUNCHERS = ("slurm", "submitit_slurm")  # conf/hydra/launcher/slurm.yaml and the submitit plugin's own


def check_hydra_option(group: str, option: str, folders: tuple[Path, ...]) -> None:
    """`hydra/<group>=<option>` names an option of one of Hydra's config groups: Hydra's own, its plugins', or one in
    `folders` (conf/ and any `--config-dir`). Hydra reports an unknown one in a dozen lines. The options are listed
    by Hydra's own config loader (internal to Hydra, which imports it itself)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the installed plugins add their options (the Optuna sweeper, submitit's launchers)
    search_path = create_config_search_path(str(folders[0]))
    for folder in folders[1:]:
        search_path.append("command-line", f"file://{folder}")
    options = ConfigLoaderImpl(config_search_path=search_path).get_group_options(group)
    if not options:
        raise FluxtrainError(f"{group}={option}: Hydra has no config group {group}")
    if option not in options:
        raise FluxtrainError(f"{group}={option} is not an option of {group}; choose one of {', '.join(options)}")


def check_launcher(arg: str, option: Any, multirun: bool) -> None:
    """A launcher runs the jobs of a multirun: without -m, Hydra would train here, on this machine (a cluster's login
    node). SLURM's submits with sbatch and srun, which a machine outside the cluster lacks (submitit's traceback)."""
    if option == "basic":  # Hydra's own, which runs the jobs here anyway
        return
    if not multirun:
        raise FluxtrainError(
            f"{arg} is a launcher: add -m to submit the run through it (without -m it would train here, on this "
            "machine)"
        )
    if option in SLURM_LAUNCHERS and shutil.which("srun") is None:
        raise FluxtrainError(
            f"{arg}: srun is not on PATH, so this machine cannot submit SLURM jobs; run the command on the cluster's "
            "login node (with its SLURM tools loaded)"
        )
