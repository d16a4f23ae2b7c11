"""Hydra command-line overrides: reading one's value, and writing a path as an override Hydra reads back as it is."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

# Hydra's options that print or describe the config instead of running a job
NO_RUN_FLAGS = ("-c", "--cfg", "-h", "--help", "--hydra-help", "-i", "--info", "--resolve", "--shell-completion")


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
