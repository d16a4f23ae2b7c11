"""Hydra's command line: its commands, reading an override's value, and writing a path as an override Hydra reads back
as it is."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Any, NoReturn

from fluxtrain.errors import FluxtrainError

# Hydra's options that print or describe the config instead of running a job (`--resolve` only changes what
# `--cfg` or `--help` print, and is refused without them)
NO_RUN_FLAGS = ("-c", "--cfg", "-h", "--help", "--hydra-help", "-i", "--info", "-sc", "--shell-completion", "--version")


def runs_nothing(args: list[str]) -> bool:
    """Whether the command line prints or describes instead of running (`--cfg job`, `--info=searchpath`, ...)."""
    return any(arg.split("=")[0] in NO_RUN_FLAGS for arg in args)


# Hydra's commands, of which a command line gives one at most: flag -> its long name
COMMANDS = {"-r": "--run", "-m": "--multirun", "-c": "--cfg", "-i": "--info", "-sc": "--shell-completion"}
COMMANDS |= {name: name for name in COMMANDS.values()}


def is_shell_completion(args: list[str]) -> bool:
    """Whether the command line sets up shell completion (`-sc install=bash`), whose value is no setting."""
    return any(COMMANDS.get(arg.split("=")[0]) == "--shell-completion" for arg in args)


# Hydra's options that take a value (`--cfg job`), and the values `--info` may take
VALUE_OPTIONS = ("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd")
VALUE_OPTIONS += ("--config-dir", "--experimental-rerun")  # fmt: skip
INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def options_first(args: list[str]) -> list[str]:
    """`args` with Hydra's options (and the values of those that take one) moved in front of the settings: Hydra's
    parser reads no setting after an option, so `model=small -m optim.lr=1e-3,3e-3` would stop at `optim.lr`, and
    `--cfg job train.seed=3` would be refused."""
    options, settings = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            settings.append(arg)
        else:
            options.append(arg)
            value = args[i + 1] if i + 1 < len(args) else None
            if value is not None and (arg in VALUE_OPTIONS or (arg in ("-i", "--info") and value in INFO_CHOICES)):
                options.append(value)
                i += 1
            elif arg in (
                "-i",
                "--info",
            ):  # its value left out, Hydra's default, said: no setting after it is read as one
                options.append("all")
        i += 1
    return options + settings


def is_multirun(args: list[str]) -> bool:
    """Whether the command line runs Hydra in multirun mode (`-m`, `--multirun` or `hydra.mode=MULTIRUN`)."""
    return any(arg in ("-m", "--multirun") or arg.replace(" ", "") == "hydra.mode=MULTIRUN" for arg in args)


def check_commands(args: list[str]) -> None:
    """Refuse what Hydra's command line would end with a traceback or a usage block: an unknown option or a bad value
    for one, two of Hydra's commands (`--cfg job -m`), an option without the command it goes with, and
    `--experimental-rerun`, which unpickles a file (and so can run code from it)."""
    given = list(dict.fromkeys(COMMANDS[arg.split("=")[0]] for arg in args if arg.split("=")[0] in COMMANDS))
    if len(given) > 1:
        raise FluxtrainError(
            f"{given[0]} and {given[1]} cannot go together: give one of --run, --multirun (-m), --cfg, --info and "
            "--shell-completion"
        )
    if "--version" in args:  # Hydra prints its version and exits
        return
    parsed = parse_hydra_args(args)
    if parsed.experimental_rerun is not None:
        raise FluxtrainError(
            "--experimental-rerun is refused: it unpickles a file, which can run code from it; to run a run again, "
            "give the settings in its .hydra/overrides.yaml"
        )
    if parsed.resolve and not (parsed.cfg or parsed.help):
        raise FluxtrainError("--resolve goes with --cfg (or --help): it resolves the config they show")
    if parsed.package is not None and not parsed.cfg:
        raise FluxtrainError(f"--package={parsed.package} goes with --cfg: it names the part of the config to show")
    if parsed.shell_completion and not any(
        o.startswith(("install=", "uninstall=", "query=")) for o in parsed.overrides
    ):
        raise FluxtrainError(
            "--shell-completion needs install=SHELL, uninstall=SHELL or query=..., e.g. -sc install=bash"
        )
    if parsed.hydra_help and parsed.overrides:
        raise FluxtrainError(f"--hydra-help takes no settings: {' '.join(parsed.overrides)}")


def parse_hydra_args(args: list[str]) -> argparse.Namespace:
    """`args` read by Hydra's own parser; a mistake there (an unknown option, a bad value) is one FluxtrainError."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str) -> NoReturn:
        raise FluxtrainError(f"{message} (see --help)")

    parser.error = error
    return parser.parse_args(args)


def override_key(name: str) -> str:
    """The setting or group an override's left side names: `++optim.lr` -> optim.lr, `model@pkg` -> model."""
    return name.lstrip("+~").partition("@")[0]


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
