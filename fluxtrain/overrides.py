"""Hydra's command line: its commands, reading an override's value, and writing a path as an override Hydra reads back
as it is."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from fluxtrain.errors import FluxtrainError

# Hydra's options that print or describe the config instead of running a job
NO_RUN_FLAGS = ("-c", "--cfg", "-h", "--help", "--hydra-help", "-i", "--info", "--resolve", "--shell-completion")


# Hydra's commands, of which a command line gives one at most: flag -> its long name
COMMANDS = {"-r": "--run", "-m": "--multirun", "-c": "--cfg", "-i": "--info", "-sc": "--shell-completion"}
COMMANDS |= {name: name for name in COMMANDS.values()}


def flags_first(args: list[str]) -> list[str]:
    """`args` with Hydra's options that take no value (`-m`, `--run`) moved in front of the settings: Hydra's parser
    reads no setting after an option, so `model=small -m optim.lr=1e-3,3e-3` would stop at `optim.lr`."""
    flags = ("-m", "--multirun", "-r", "--run")
    return [a for a in args if a in flags] + [a for a in args if a not in flags]


def is_multirun(args: list[str]) -> bool:
    """Whether the command line runs Hydra in multirun mode (`-m`, `--multirun` or `hydra.mode=MULTIRUN`)."""
    return any(arg in ("-m", "--multirun") or arg.replace(" ", "") == "hydra.mode=MULTIRUN" for arg in args)


def check_commands(args: list[str]) -> None:
    """Refuse two of Hydra's commands on one command line (`--cfg job -m`), which Hydra reports with a traceback."""
    given = list(dict.fromkeys(COMMANDS[arg.split("=")[0]] for arg in args if arg.split("=")[0] in COMMANDS))
    if len(given) > 1:
        raise FluxtrainError(
            f"{given[0]} and {given[1]} cannot go together: give one of --run, --multirun (-m), --cfg, --info and "
            "--shell-completion"
        )


def hydra_value(override: str) -> Any:
    """The value Hydra reads from the override `key=value`, or None where it cannot parse it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_override(override).value()
    except HydraException:
        return None


def hydra_override(key: str, path: str | Path) -> str:
    """`key=path` as Hydra reads it back as `path`: as it is where it does, else in Hydra's double quotes, with a
    quote, the backslashes before one and an interpolation's `${` escaped (`=`, `,` and spaces need nothing more)."""
    value = str(path)
    plain = f"{key}={value}"
    if "${" not in value and hydra_value(plain) == value:
        return plain
    value = re.sub(r"(\\*)\$\{", lambda m: 2 * m[1] + "\\${", value)  # OmegaConf reads `\${` as a plain `${`
    value = re.sub(r'(\\*)"', lambda m: 2 * m[1] + '\\"', value)  # Hydra un-escapes backslashes only before a quote
    value = re.sub(r"(\\+)$", lambda m: 2 * m[1], value)  # (the closing one too)
    return f'{key}="{value}"'


def path_override(key: str, path: str | Path) -> str:
    """`hydra_override` as one shell word, for the commands and hints people copy."""
    return shlex.quote(hydra_override(key, path))
