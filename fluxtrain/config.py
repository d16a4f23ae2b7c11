"""The structured config: one dataclass per component, registered in Hydra's ConfigStore, and the conf/ folder."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fluxtrain.data import DataConfig
from fluxtrain.errors import FluxtrainError, describe_failure, first_line
from fluxtrain.lr_find import LRFindConfig
from fluxtrain.model import ModelConfig
from fluxtrain.optim import OptimConfig
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


def check_finite(cfg: DictConfig) -> None:
    """Refuse a NaN or infinite number in any setting (`train.max_time=inf`, `optim.lr=nan`): range checks such as
    `lr > 0` cannot see NaN, and an infinite budget or rate would run without an end or a decay."""
    for key, value in flat_settings(OmegaConf.to_container(cfg, resolve=False)).items():
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                what = "hold finite numbers only" if isinstance(value, list) else "be a finite number"
                raise FluxtrainError(f"{key}={value} must {what}")


def check_overrides(args: list[str]) -> None:
    """Refuse, in one line, a command-line setting the schema does not have or a value of the wrong type, before
    Hydra composes the config (whose own report takes several lines and suggests adding the key with `+`).

    A setting Hydra's grammar cannot read is named with the reason. Config groups (`model=small`), Hydra's own
    settings and `~` overrides are left to Hydra; a key added with `+` must be a setting too; sweeps
    (`optim.lr=1e-4,1e-3`) are checked value by value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    extra = _extra_config_dirs(args)
    for folder in extra:  # Hydra reports a YAML syntax error in a user's config with a long traceback
        for path in sorted(folder.rglob("*.yaml")):
            check_yaml(path)
    groups = {p.name for folder in (config_dir(), *extra) for p in folder.iterdir() if p.is_dir()}
    schema, parser = OmegaConf.structured(Config), OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
            key = override.key_or_group
            if override.is_delete() or "/" in key or "@" in key:
                continue
            if key in groups or key.split(".")[0] == "hydra":
                continue
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except OverrideParseException as e:
            reason = next(line for line in str(e).splitlines() if not line.startswith("Error parsing override"))
            raise FluxtrainError(
                f"cannot read the setting {arg!r} ({reason}); a value with spaces or any of =,[]{{}}()'\" goes in "
                "quotes: 'key=\"value\"'"
            ) from None
        except (HydraException, OmegaConfBaseException, ValueError, TypeError):
            continue  # Hydra reports it
        unknown = _unknown_keys(_nested(key.split("."), None), Config())
        if unknown:
            name, close = unknown[0]
            hint = f" (did you mean {close}?)" if close else ""
            raise FluxtrainError(f"{name} is not a fluxtrain setting{hint}")
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue  # an interpolation: resolved later
            try:
                OmegaConf.update(schema.copy(), key, value, merge=True)
            except OmegaConfBaseException as e:
                raise FluxtrainError(f"{key}: {first_line(e)}") from None


def check_yaml(path: Path) -> None:
    """A one-line error naming the file, line and column when `path` is not valid YAML."""
    try:
        with open(path, encoding="utf-8") as f:
            yaml.compose(f, Loader=yaml.SafeLoader)  # syntax only: nothing is constructed
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise FluxtrainError(f"--config-dir: {path}{where} is not valid YAML ({problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FluxtrainError(f"--config-dir: {path} cannot be read ({describe_failure(e)})") from None


def _extra_config_dirs(args: list[str]) -> list[Path]:
    """The folders given with `--config-dir DIR` (or `-cd DIR`, `--config-dir=DIR`): their config groups count too."""
    found = []
    for i, arg in enumerate(args):
        if arg in ("--config-dir", "-cd") and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith("--config-dir="):
            found.append(arg.partition("=")[2])
    return [Path(f).expanduser() for f in found if Path(f).expanduser().is_dir()]


def _nested(keys: list[str], leaf: Any) -> dict[str, Any]:
    """{"a": {"b": leaf}} from ["a", "b"]."""
    return {keys[0]: _nested(keys[1:], leaf) if len(keys) > 1 else leaf}


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
