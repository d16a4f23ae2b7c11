"""The structured config: one dataclass per component, registered in Hydra's ConfigStore, and the conf/ folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from fluxtrain.data import DataConfig
from fluxtrain.lr_find import LRFindConfig
from fluxtrain.model import ModelConfig
from fluxtrain.optim import OptimConfig
from fluxtrain.tokenizer import TokenizerConfig
from fluxtrain.train import TrainConfig


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)
    task: str = "train"  # train | lr_find
    resume: str | None = None  # a checkpoint file, or "auto" for the newest in the run folder


def config_dir() -> Path:
    """conf/ shipped inside the package (wheel), else the repository's conf/ (editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
