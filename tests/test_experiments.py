"""Every experiment file in conf/experiment composes with the structured config and names real settings."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fluxtrain.config import config_dir
from fluxtrain.model import ModelConfig
from fluxtrain.optim import OptimConfig
from fluxtrain.optim import validate as validate_optim
from fluxtrain.train import TrainConfig
from fluxtrain.train import validate as validate_train

from .conftest import compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


def test_the_speed_experiments_are_there():
    assert {"shakespeare_cpu", "shakespeare_gpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    cfg = compose_config([f"experiment={name}"])
    assert cfg.model != compose_config().model and cfg.optim != compose_config().optim  # the recipe applies
    model = ModelConfig(**OmegaConf.to_container(cfg.model))
    model.validate()
    validate_optim(OptimConfig(**OmegaConf.to_container(cfg.optim)))
    validate_train(TrainConfig(**OmegaConf.to_container(cfg.train)))


def test_cpu_experiment_is_a_time_budgeted_run_measured_on_100_val_batches():
    cfg = compose_config(["experiment=shakespeare_cpu"])
    assert cfg.train.max_time is not None and cfg.train.max_time <= 150
    assert cfg.train.eval_iters >= 100
    assert cfg.train.device == "cpu"


def test_gpu_experiment_uses_bf16_and_compile():
    cfg = compose_config(["experiment=shakespeare_gpu"])
    assert cfg.train.precision == "bf16" and cfg.train.compile
    assert cfg.train.eval_iters >= 100


def test_experiment_does_not_change_the_plain_presets():
    plain = compose_config(["model=small"])
    assert plain.model.d_model == 128 and plain.model.n_layers == 2 and plain.optim.name == "adam"
