"""The structured config: one dataclass per component, registered in Hydra's ConfigStore, and the conf/ folder."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fluxtrain.data import DataConfig
from fluxtrain.errors import FluxtrainError
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


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse settings the schema does not have. Hydra rejects `model.d_modl=64`, but its `+model.d_modl=64` (as
    its own error message suggests) adds the key past the schema; it would then be ignored or fail deep inside."""
    unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config())
    if unknown:
        key, close = unknown[0]
        hint = f" (did you mean {close}?)" if close else ""
        others = f"; also unknown: {', '.join(k for k, _ in unknown[1:])}" if len(unknown) > 1 else ""
        raise FluxtrainError(f"{key} is not a fluxtrain setting{hint}{others}")


def _unknown_keys(values: dict[str, Any], schema: Any, prefix: str = "") -> list[tuple[str, str | None]]:
    """(dotted key, closest known key or None) of each key in `values` that the dataclass `schema` lacks."""
    known = [f.name for f in fields(schema)]
    out = []
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            out.append((f"{prefix}{key}", f"{prefix}{close[0]}" if close else None))
        elif is_dataclass(getattr(schema, key)) and isinstance(value, dict):
            out += _unknown_keys(value, getattr(schema, key), f"{prefix}{key}.")
    return out
