"""The tasks a `python -m fluxtrain` run can do (`task=train|lr_find`), run on a composed config in a run folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from fluxtrain import distributed
from fluxtrain.config import check_config
from fluxtrain.errors import FluxtrainError
from fluxtrain.files import WriteError
from fluxtrain.lr_find import lr_find
from fluxtrain.resume import write_failed
from fluxtrain.run_folder import restore_run_config
from fluxtrain.train import train

# task name -> function(cfg, run_dir) returning the value a sweeper minimises
TASKS: dict[str, Callable[[DictConfig, Path], float]] = {
    "train": lambda cfg, run_dir: train(cfg, run_dir)["best_val_loss"],
    "lr_find": lambda cfg, run_dir: lr_find(cfg, run_dir).suggested_lr,
}


def run_task(cfg: DictConfig, run_dir: Path) -> float:
    """Check `cfg` and run `cfg.task` in `run_dir`; a file of a training run that cannot be written stops it with
    the last good checkpoint and the command that resumes from it."""
    try:
        check_config(cfg)
        if cfg.task not in TASKS:
            raise FluxtrainError(f"task={cfg.task!r} is not one of {', '.join(TASKS)}")
        return TASKS[cfg.task](cfg, run_dir)
    except BaseException as e:
        restore_run_config(run_dir)  # refused before it claimed the folder: Hydra's earlier config files go back
        if isinstance(e, WriteError) and cfg.task == "train" and run_dir.resolve() in e.path.resolve().parents:
            world = distributed.current_world()
            raise write_failed(e, run_dir, world.world_size, distributed.local_world_size(world)) from None
        raise
