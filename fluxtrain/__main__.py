"""`python -m fluxtrain` (or `torchrun ... -m fluxtrain`): compose the config with Hydra and run the chosen task."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fluxtrain import distributed, host
from fluxtrain.command_line import check_overrides
from fluxtrain.config import config_dir, register_configs
from fluxtrain.errors import (
    FluxtrainError,
    held_stdout,
    is_out_of_memory,
    out_of_memory_message,
    paths_named,
    quiet_when_stdout_closes,
)
from fluxtrain.interrupt import StoppedInSetup, TrainingInterrupted
from fluxtrain.logs import report_error, silenced
from fluxtrain.overrides import check_commands, is_shell_completion, options_first, runs_nothing
from fluxtrain.run_folder import check_output_dir, discard_refused, expand_home_in_run_dirs
from fluxtrain.sweep import run_sweep_job
from fluxtrain.tasks import run_task

register_configs()


def run(cfg: DictConfig) -> float:
    """Run `cfg.task` in Hydra's output folder; returns the best val loss when training, for sweepers."""
    world = distributed.init_world()  # a no-op when main() joined already; SLURM tasks join here
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    distributed.quiet_other_ranks(world)
    # A single run refused before it claimed its folder leaves no folder behind; a sweep's failed job keeps its
    # failed.json. Under torchrun every rank discards: rank 0 its config files and log, a later rank the folder its
    # Hydra made again once rank 0's was gone.
    single_run = hydra_cfg.mode == RunMode.RUN
    try:
        distributed.publish_run_dir(str(run_dir))  # a rank stopped meanwhile: peer_left below
        with paths_named():
            if hydra_cfg.mode == RunMode.MULTIRUN:
                overrides = OmegaConf.to_container(hydra_cfg.overrides.task)
                return run_sweep_job(lambda: run_task(cfg, run_dir), run_dir, overrides, hydra_cfg.job.num)
            return run_task(cfg, run_dir)
    except FluxtrainError as e:
        if not e.reported or (isinstance(e, TrainingInterrupted) and silenced()):  # a stop's log lines went unseen
            report_error(f"error: {e}")
        if single_run:
            discard_refused(run_dir)
        sys.exit(getattr(e, "exit_code", 1))  # 130/143 after a stop on SIGINT/SIGTERM
    except KeyboardInterrupt:  # a sweep's job too leaves no folder when stopped before it began
        logging.getLogger("fluxtrain").error("interrupted")
        discard_refused(run_dir)
        sys.exit(130)
    except StoppedInSetup as e:  # a warning: under torchrun, the ranks stopped after another one failed stay quiet
        logging.getLogger("fluxtrain").warning("stopped by SIGTERM before training began")
        discard_refused(run_dir)
        sys.exit(e.code)
    except (RuntimeError, MemoryError) as e:
        if distributed.peer_left(e):  # another rank stopped (on an error it printed, or a signal): no traceback
            logging.getLogger("fluxtrain").warning("stopped: another rank of this torchrun job ended")
            if single_run:
                discard_refused(run_dir)  # a folder still holding only Hydra's files: one the run never claimed
            sys.exit(1)
        if not is_out_of_memory(e):
            raise
        report_error(f"error: {out_of_memory_message(e)}")
        sys.exit(1)


hydra_main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(run)
# `fluxtrain-lr-find`: conf/lr_find.yaml is the primary config with task=lr_find
_lr_find_main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="lr_find")(run)


def main(cfg: DictConfig | None = None, entry: Callable[[], object] = hydra_main) -> float | None:
    """The `fluxtrain` command (also under torchrun). With a composed `cfg`, runs it as Hydra's job function, which
    needs Hydra's own config set (`HydraConfig`), as Hydra sets it for a job; from Python, `fluxtrain.train.train`
    takes a composed config and a folder."""
    if cfg is not None:
        return hydra_main(cfg)
    host.collect_less()
    try:
        with paths_named():
            sys.argv[1:] = options_first(sys.argv[1:])
            check_commands(sys.argv[1:])
            if not is_shell_completion(sys.argv[1:]):
                check_overrides(sys.argv[1:])
            sys.argv[1:] = distributed.follow_main_run_dir(
                expand_home_in_run_dirs(sys.argv[1:])
            )  # torchrun: rank 0's folder
            check_output_dir(sys.argv[1:])
    except FluxtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # under torchrun, while a rank waits for rank 0's run folder
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    try:
        with quiet_when_stdout_closes(), held_stdout(runs_nothing(sys.argv[1:])):
            entry()
    except KeyboardInterrupt:  # while Hydra composes the config; the run itself reports its own stop
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        distributed.leave_world_after_error()
        raise
    distributed.close_world()
    return None


def lr_find_main() -> None:
    """The `fluxtrain-lr-find` command: `fluxtrain` with conf/lr_find.yaml (task=lr_find) as the primary config."""
    main(entry=_lr_find_main)


if __name__ == "__main__":
    main()
