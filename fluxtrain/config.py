"""The structured config: one dataclass per component, registered in Hydra's ConfigStore, the conf/ folder, and the
checks of a composed config (unknown keys, non-finite numbers, interpolations that do not resolve)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fluxtrain.data import DataConfig
from fluxtrain.errors import FluxtrainError, first_line
from fluxtrain.lr_find import LRFindConfig
from fluxtrain.model import ModelConfig
from fluxtrain.optim import OptimConfig
from fluxtrain.overrides import override_key
from fluxtrain.runs import flat_settings
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
    init_from: str | None = None  # a model file, checkpoint or run folder whose weights a fresh run starts from


def config_dir() -> Path:
    """conf/ shipped inside the package (wheel), else the repository's conf/ (editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `python -m fluxtrain OVERRIDES` would run, for training from Python (`fluxtrain.train.train(cfg,
    run_dir)`): the same settings, checked the same way, each mistake a one-line FluxtrainError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fluxtrain.command_line import check_overrides  # it reads this module's schema

    if isinstance(overrides, str):
        raise FluxtrainError(f"overrides: give a list of settings, e.g. [{overrides!r}], not one text")
    if not isinstance(overrides, list | tuple):
        raise FluxtrainError(
            f"overrides: give a list of settings such as ['model=small'], not {type(overrides).__name__}"
        )
    overrides = list(overrides)
    if bad := next((o for o in overrides if not isinstance(o, str) or o.startswith("-")), None):
        raise FluxtrainError(f"overrides: {bad!r} is not a setting (key=value); options such as -m are the command's")
    for override in overrides:
        if _is_sweep(override):
            raise FluxtrainError(f"{override}: compose makes one config; compose one per value, or sweep with -m")
        if override_key(override.partition("=")[0]).split(".")[0].split("/")[0] == "hydra":
            raise FluxtrainError(
                f"{override}: Hydra's settings are the command line's; train(cfg, run_dir) takes the folder"
            )
    check_overrides(overrides)
    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    check_config(cfg)
    return cfg


def _is_sweep(override: str) -> bool:
    """Whether a setting sweeps (`optim.lr=1e-3,1e-2`) or searches (`hparams_search=...`); one that Hydra's grammar
    cannot read is left to `check_overrides`, which names the problem."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        (parsed,) = OverridesParser.create().parse_overrides([override])
    except OverrideParseException:
        return False
    search = parsed.key_or_group == "hparams_search" and not parsed.is_delete() and parsed.value() is not None
    return parsed.is_sweep_override() or search


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse settings the schema does not have. Hydra rejects `model.d_modl=64`, but its `+model.d_modl=64` (as
    its own error message suggests) adds the key past the schema; it would then be ignored or fail deep inside."""
    unknown = unknown_keys(OmegaConf.to_container(cfg, resolve=False), Config())
    if unknown:
        key, close = unknown[0]
        hint = f" (did you mean {close}?)" if close else ""
        others = f"; also unknown: {', '.join(k for k, _ in unknown[1:])}" if len(unknown) > 1 else ""
        raise FluxtrainError(f"{key} is not a fluxtrain setting{hint}{others}")


def check_finite(cfg: DictConfig) -> None:
    """Refuse a NaN or infinite number in any setting (`train.max_time=inf`, `optim.lr=nan`): range checks such as
    `lr > 0` cannot see NaN, and an infinite budget or rate would run without an end or a decay."""
    for key, value in flat_settings(OmegaConf.to_container(cfg, resolve=False)).items():
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                what = "hold finite numbers only" if isinstance(value, list) else "be a finite number"
                raise FluxtrainError(f"{key}={value} must {what}")


def check_config(cfg: DictConfig) -> None:
    """The checks of a composed config that need nothing else, each a one-line error naming the setting: keys the
    schema lacks, interpolations that do not resolve, an empty `resume` or `init_from`, numbers that are not finite."""
    check_known_keys(cfg)
    check_values(cfg)
    check_finite(cfg)


def check_values(cfg: DictConfig) -> None:
    """Refuse, in one line naming the setting, an interpolation that does not resolve (`optim.lr=${optim.nope}`,
    `${oc.env:UNSET}`, a value of the wrong type) and an empty `resume`, which would start afresh without a word."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "a setting"
        raise FluxtrainError(f"{key}: {first_line(e)}") from None
    if cfg.get("resume") is not None and not str(cfg.resume).strip():
        raise FluxtrainError(
            f"resume={cfg.resume!r} is empty; give a checkpoint file, auto (the newest in the run folder), or null to "
            "start afresh"
        )
    if cfg.get("init_from") is not None and not str(cfg.init_from).strip():
        raise FluxtrainError(
            f"init_from={cfg.init_from!r} is empty; give a model file, a checkpoint or a run folder, or null to start "
            "from random weights"
        )


def nested(keys: list[str], leaf: Any) -> dict[str, Any]:
    """{"a": {"b": leaf}} from ["a", "b"]."""
    return {keys[0]: nested(keys[1:], leaf) if len(keys) > 1 else leaf}


def unknown_keys(values: dict[str, Any], schema: Any, prefix: str = "") -> list[tuple[str, str | None]]:
    """(dotted key, closest known key or None) of each key in `values` that the dataclass `schema` lacks."""
    known = [f.name for f in fields(schema)]
    out = []
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            out.append((f"{prefix}{key}", f"{prefix}{close[0]}" if close else None))
        elif is_dataclass(getattr(schema, key)) and isinstance(value, dict):
            out += unknown_keys(value, getattr(schema, key), f"{prefix}{key}.")
    return out
