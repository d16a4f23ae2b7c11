"""Checks of the `python -m fluxtrain` command line before Hydra composes the config: every setting the schema
lacks, every value of the wrong type or group option that does not exist is one line naming it, where Hydra's own
reports take several lines or a traceback."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fluxtrain.config import Config, config_dir, nested, unknown_keys
from fluxtrain.errors import FluxtrainError, describe_failure, did_you_mean, first_line
from fluxtrain.hydra_settings import (
    check_hydra_option,
    check_hydra_setting,
    check_launcher,
    hydra_settings_schema,
    hydra_type_problem,
)
from fluxtrain.overrides import VALUE_OPTIONS, is_multirun, override_key, runs_nothing
from fluxtrain.runs import flat_settings


def check_overrides(args: list[str]) -> None:
    """Refuse, in one line, a command-line setting the schema does not have or a value of the wrong type, before
    Hydra composes the config (whose own report takes several lines and suggests adding the key with `+`).

    A setting Hydra's grammar cannot read is named with the reason, and so is a sweep without `-m`, an interpolation
    of a setting that does not exist, and an empty or null `hydra.run.dir`. A config group takes one of its options
    (`model=small`); one that an experiment on the same command line would override is refused, and a group of a
    `--config-dir` alone is added with `+`. The options chosen from a `--config-dir`, and a primary config there
    (`--config-name`, which starts from fluxtrain's), are checked like the command line, with the files of the
    `--config-dir` their defaults lists build on. Hydra's own settings are checked for their type (Hydra's schema, the
    Optuna sweeper's for a search) and a few for their value, a key Hydra's schema lacks is left to Hydra; a launcher
    needs `-m`; a key added with `+` must be a setting too; sweeps (`optim.lr=1e-4,1e-3`) are checked value by value.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.core.utils import setup_globals
    from hydra.errors import OverrideParseException

    extra = _extra_config_dirs(args)
    for folder in extra:  # Hydra reports a YAML syntax error in a user's config with a long traceback
        for path in sorted(folder.rglob("*.yaml")):
            check_yaml(path)
    folders = (config_dir(), *extra)
    _check_config_name(args, folders)
    groups = {p.name for folder in folders for p in folder.iterdir() if p.is_dir()}
    # Options found elsewhere too (another primary config folder, a search path) are left to Hydra.
    elsewhere = _option_values(args, ("--config-path", "-cp")) or any(
        override_key(arg).startswith("hydra.searchpath") for arg in args
    )
    options = {} if elsewhere else group_options(folders)
    own_primary = bool(_option_values(args, ("--config-name", "-cn")))  # whose defaults may lack a group
    multirun = is_multirun(args)
    prints_only = runs_nothing(args)  # the search's config, and no trials
    setup_globals()  # Hydra's resolvers (`${now:...}`), for the interpolation check
    schema, parser = OmegaConf.structured(Config), OverridesParser.create()
    chosen: dict[str, list[str]] = {}
    hydra_schema = None  # Hydra's own, made at the first `hydra.` setting
    for i, arg in enumerate(args):
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        if i > 0 and args[i - 1] in VALUE_OPTIONS:  # `--config-dir ~/conf`: a folder, not a setting
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as e:
            reason = next(line for line in str(e).splitlines() if not line.startswith("Error parsing override"))
            raise FluxtrainError(
                f"cannot read the setting {arg!r} ({reason}); a value with spaces or any of =,[]{{}}()'\" goes in "
                "quotes: 'key=\"value\"'"
            ) from None
        if override.is_sweep_override() and not multirun:
            raise FluxtrainError(
                f"{arg} is a sweep: add -m to run one job per value (a list goes in brackets, key=[a,b], and a text "
                "with commas in quotes, key='a,b')"
            )
        key = override.key_or_group
        if key.startswith("hydra/") and not override.is_delete() and override.value() is None:  # Hydra: a traceback
            stock = "basic" if key in ("hydra/launcher", "hydra/sweeper") else "default"  # Hydra's own option
            raise FluxtrainError(f"{key}=null is not an option of {key}: name one, e.g. {key}={stock}")
        if key.startswith("hydra/") and not elsewhere and isinstance(override.value(), str):
            check_hydra_option(key, override.value(), folders)
        if key == "hydra/launcher" and not prints_only and not override.is_delete():
            check_launcher(arg, override.value(), multirun)
        if "/" in key or "@" in key:
            continue
        searches = not override.is_delete() and override.value() is not None  # `hparams_search=null` chooses none
        if key == "hparams_search" and searches and not multirun and not prints_only:
            raise FluxtrainError(
                f"{arg} is a search: add -m to run its trials (without -m it would train one run with the search's "
                "settings)"
            )
        try:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        except (HydraException, OmegaConfBaseException, ValueError, TypeError):
            if isinstance(override.value(), Glob) and key not in groups:  # Hydra would launch no job
                raise FluxtrainError(
                    f"{arg}: glob() picks options of a config group, and {key} is not one; list the values instead "
                    f"({key}=a,b)"
                ) from None
            continue  # Hydra reports it
        if override.is_sweep_override() and not values:
            raise FluxtrainError(f"{arg} sweeps over no values: give at least one")
        _check_interpolations(arg, values)
        if key.split(".")[0] == "hydra":
            if override.is_sweep_override():
                raise FluxtrainError(
                    f"{arg}: Hydra's own settings cannot be swept; sweep fluxtrain's settings, once per {key}"
                )
            check_hydra_setting(arg, key, values)
            hydra_schema = hydra_schema if hydra_schema is not None else hydra_settings_schema(args)
            for value in [] if override.is_delete() else values:
                if problem := hydra_type_problem(key, value, hydra_schema):
                    raise FluxtrainError(f"{key}: {problem}")
        elif key in options and not override.is_delete():
            chosen[key] = _check_group_choice(arg, override, values, options[key], own_primary)
        elif key not in groups:
            _check_setting(override, key, values, schema)
    _check_experiment_presets(chosen, folders)
    primary = [] if _option_values(args, ("--config-path", "-cp")) else _option_values(args, ("--config-name", "-cn"))
    files = [("", name.removesuffix(".yaml")) for name in primary]
    files += [(group, f"{group}/{option}") for group, chosen_options in chosen.items() for option in chosen_options]
    checked = _check_defaults_tree(files, folders, extra, options, schema, complete=not elsewhere)
    for name in [] if elsewhere else [name for group, name in files if not group]:
        path = _config_file(folders, name)
        if path is not None and _in_config_dir(path, extra) and not _starts_from_fluxtrains(name, folders, extra):
            raise FluxtrainError(
                f"--config-dir: {path}: a primary config that does not start from fluxtrain's config; begin it "
                "with defaults: [config, _self_]"
            )
    config_groups = {group for group, _ in _group_entries("", _defaults_list(config_dir() / "config.yaml"))}
    for folder, path in checked:  # each builds on fluxtrain's config, whose choices it must override
        for group, entry in _group_entries(folder, _defaults_list(path)):
            if group in config_groups and not entry.startswith(("override ", "optional ")):
                raise FluxtrainError(
                    f"--config-dir: {path}: its defaults list chooses {entry}, which fluxtrain's config chooses "
                    f"already; write override {entry}"
                )


def group_options(folders: tuple[Path, ...]) -> dict[str, list[str]]:
    """Each config group (Hydra's own `hydra/` aside) and its options in `folders` (conf/ and any `--config-dir`),
    sorted: {"model": ["gpt2", ..., "small"], ...}. A folder holding no .yaml file is left out."""
    groups = {p.name for f in folders for p in f.iterdir() if p.is_dir() and p.name != "hydra"}
    options = {
        group: sorted(
            {p.relative_to(f / group).with_suffix("").as_posix() for f in folders for p in (f / group).rglob("*.yaml")}
        )
        for group in sorted(groups)
    }
    return {group: found for group, found in options.items() if found}


def _check_setting(override, key: str, values: list[Any], schema: DictConfig) -> None:
    """A fluxtrain setting on the command line: one the schema has, given a value of its type."""
    if problem := _unknown_setting(key):
        raise FluxtrainError(problem)
    if override.is_delete():
        raise FluxtrainError(f"~{key}: a fluxtrain setting cannot be removed; give it a value instead ({key}=...)")
    for value in values:
        if problem := _type_problem(key, value, schema):
            if isinstance(OmegaConf.select(schema, key), ListConfig) and isinstance(value, (str, int, float)):
                problem = f"takes a list, in brackets and quoted for the shell, e.g. {key}='[{value}]'"
            raise FluxtrainError(f"{key}: {problem}")


def _unknown_setting(key: str) -> str | None:
    """`model.d_modl is not a fluxtrain setting (did you mean model.d_model?)`, or None for a setting."""
    unknown = unknown_keys(nested(key.split("."), None), Config())
    if not unknown:
        return None
    name, close = unknown[0]
    return f"{name} is not a fluxtrain setting" + (f" (did you mean {close}?)" if close else "")


def _type_problem(key: str, value: Any, schema: DictConfig) -> str | None:
    """Why `value` does not fit the setting `key` (a text for an integer, say), or None; interpolations are resolved
    later."""
    if isinstance(value, str) and "${" in value:
        return None
    try:
        OmegaConf.update(schema.copy(), key, value, merge=True)
    except OmegaConfBaseException as e:
        return first_line(e)
    return None


def _check_group_choice(arg: str, override, values: list[Any], options: list[str], own_defaults: bool) -> list[str]:
    """The options a `group=option` override chooses (several for a sweep or a list), each one of `options`."""
    key = override.key_or_group
    if not (config_dir() / key).is_dir():  # a group of a `--config-dir` alone, which conf/'s defaults lack
        if override.is_force_add() or not (override.is_add() or own_defaults):
            raise FluxtrainError(f"{arg}: {key} is in no defaults list of fluxtrain's; add it with +{arg.lstrip('+')}")
    elif override.is_force_add() or (override.is_add() and not own_defaults):
        sign = "++" if override.is_force_add() else "+"
        raise FluxtrainError(f"{arg}: {key} is chosen in the defaults already; give {arg[len(sign) :]} without {sign}")
    chosen = []
    for value in values:
        for option in value if isinstance(value, list) else [value]:
            if option is None:
                raise FluxtrainError(
                    f"{key}=null is not an option of {key}; choose one of {', '.join(options)}, or leave the group "
                    f"out with ~{key}"
                )
            if str(option) not in options:
                hint = did_you_mean(option, options, f"{key}={{}}")
                listed = ", ".join(options)
                raise FluxtrainError(f"{key}={option} is not an option of {key}{hint}; its options: {listed}")
            chosen.append(str(option))
    return chosen


def _check_experiment_presets(chosen: dict[str, list[str]], folders: tuple[Path, ...]) -> None:
    """Refuse a group option that an experiment on the same command line overrides: `experiment=shakespeare_gpu
    model=small` would train the experiment's own model shape, not the small preset's."""
    for experiment in chosen.get("experiment", []):
        recipe = _option_config(folders, "experiment", experiment)
        for group, options in chosen.items():  # an option added with `+` (of a `--config-dir` group) merges later
            settings = recipe.get(group) if group != "experiment" and (config_dir() / group).is_dir() else None
            if not isinstance(settings, dict):
                continue
            for option in options:
                preset = _option_config(folders, group, option)
                replaced = [k for k, v in settings.items() if k in preset and preset[k] != v]
                if replaced:
                    listed = ", ".join(f"{group}.{k}={settings[k]}" for k in replaced)
                    raise FluxtrainError(
                        f"{group}={option} would not apply: experiment={experiment} sets {listed}; change those "
                        f"settings instead (e.g. {group}.{replaced[0]}={preset[replaced[0]]})"
                    )


def _check_option_file(
    path: Path, group: str, options: dict[str, list[str]], schema: DictConfig, subfolder: str = ""
) -> None:
    """The file of a `--config-dir` holding a group option the command line chooses or one built on (or a primary
    config, when `group` is "", found in `subfolder`), read as Hydra would merge it: each setting one the schema has,
    with a value of its type, and each option its defaults list names one that exists; Hydra's own reports of these
    take several lines."""
    try:
        text = path.read_text(encoding="utf-8")
        body = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return  # check_yaml names it
    if body is None:
        return
    if not isinstance(body, dict):
        raise FluxtrainError(f"--config-dir: {path} holds a {type(body).__name__}, not settings (key: value lines)")
    if subfolder and "@package _global_" not in text:
        package = subfolder.replace("/", ".")
        raise FluxtrainError(
            f"--config-dir: {path}: a primary config in a subfolder puts its settings under {package} unless its "
            "first line is # @package _global_"
        )
    for name, value in _defaults_choices(group or subfolder, body.get("defaults")):
        if name in options and str(value) not in options[name]:
            listed = ", ".join(options[name])
            raise FluxtrainError(f"--config-dir: {path} chooses {name}={value}, not an option of {name}: {listed}")
    global_package = not group or "@package _global_" in text
    if not global_package and group not in Config.__dataclass_fields__:
        return  # a group of the user's own, which Hydra merges where its package says
    body = {k: v for k, v in body.items() if k != "defaults"}  # Hydra's, not settings
    settings = {k: v for k, v in body.items() if k != "hydra"} if global_package else {group: body}
    for key, value in flat_settings(settings).items():
        if problem := _unknown_setting(key):
            raise FluxtrainError(f"--config-dir: {path}: {problem}")
        if problem := _type_problem(key, value, schema):
            raise FluxtrainError(f"--config-dir: {path}: {key}={value!r}: {problem}")


def _check_defaults_tree(
    files: list[tuple[str, str]],
    folders: tuple[Path, ...],
    extra: list[Path],
    options: dict[str, list[str]],
    schema: DictConfig,
    complete: bool = True,
) -> list[tuple[str, Path]]:
    """Check each file of a `--config-dir` that `files` name ((group, name) pairs: `("model", "model/tiny")`, or
    `("", "myexp")` for a primary config) and each one their defaults lists build on, however deep, as
    `_check_option_file` does (conf/'s are tested with it). A defaults list that comes back to a file it builds on is
    one line, where Hydra's report is a RecursionError; so is one naming a config that none of `folders` holds, when
    they are `complete` (no other search path), where Hydra's report lists its search path. A primary config in a
    subfolder (`sub/myexp`) reads its defaults list from there, as Hydra does. Returns the files checked, each with
    the folder its defaults list is read from (`model`, or "" for a primary config at the top)."""
    checked: dict[str, tuple[str, Path]] = {}

    def check(group: str, name: str, chain: list[str]) -> None:
        path = _config_file(folders, name)
        if path is None or not _in_config_dir(path, extra) or name in checked:
            return
        subfolder = "" if group else name.rpartition("/")[0]  # a primary config's, which its defaults start from
        checked[name] = (group or subfolder, path)
        _check_option_file(path, group, options, schema, subfolder)
        chain = [*chain, name]
        for choice_group, option in _defaults_choices(group or subfolder, _defaults_list(path)):
            choice = f"{choice_group}/{option}".lstrip("/")
            if choice in chain:
                loop = " -> ".join([*chain[chain.index(choice) :], choice])
                raise FluxtrainError(f"--config-dir: {path}: its defaults list comes back to {choice} ({loop})")
            if complete and not _is_config(folders, choice):
                where = " or ".join(str(folder) for folder in folders)
                raise FluxtrainError(
                    f"--config-dir: {path}: its defaults list names {choice}, which is no config in {where} (names "
                    "are read from the file's own folder, or from the top with a leading /: /model: small)"
                )
            check(choice_group, choice, chain)

    for group, name in files:
        check(group, name, [])
    return list(checked.values())


# The primary configs a user's own builds on: conf/'s
FLUXTRAIN_PRIMARIES = ("config", "lr_find")


def _starts_from_fluxtrains(name: str, folders: tuple[Path, ...], extra: list[Path]) -> bool:
    """Whether the primary config `name` is one of fluxtrain's or builds on one, through the defaults lists of the
    primary configs of a `--config-dir` (without fluxtrain's, the run lacks its settings: a traceback)."""
    if name in FLUXTRAIN_PRIMARIES:
        return True
    path = _config_file(folders, name)
    if path is None or not _in_config_dir(path, extra):
        return False
    choices = _defaults_choices(name.rpartition("/")[0], _defaults_list(path))
    return any(not group and _starts_from_fluxtrains(option, folders, extra) for group, option in choices)


def _is_config(folders: tuple[Path, ...], name: str) -> bool:
    """Whether Hydra finds the config `name`: a file in `folders`, a structured config, or one of Hydra's own."""
    stored = f"{name}.yaml" in ConfigStore.instance().repo or name.split("/")[0] == "hydra"
    return stored or _config_file(folders, name) is not None


def _config_file(folders: tuple[Path, ...], name: str) -> Path | None:
    """The file of the config `name` (`model/small`, or a primary config's `config`), found first in `folders`."""
    return next((f / f"{name}.yaml" for f in folders if (f / f"{name}.yaml").is_file()), None)


def _in_config_dir(path: Path, extra: list[Path]) -> bool:
    return any(path.is_relative_to(folder) for folder in extra)


def _defaults_list(path: Path) -> Any:
    """The defaults list of the config file `path` as written, or None (check_yaml names a file it cannot read)."""
    try:
        body = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return body.get("defaults") if isinstance(body, dict) else None


def _defaults_choices(group: str, defaults: Any) -> list[tuple[str, str]]:
    """The (group, option) pairs the defaults list of a file in `group/` names, as Hydra reads them: `- small` is an
    option of the file's own group, `- sub: x` one of its subgroup `group/sub`, and `- /model: small` (or
    `- override /model: small`, `- /model/small`) one of the group `model`; `_self_`, `null` and interpolations are
    left out. The primary config (`group` "") names groups as `/model` does."""
    paths = []
    for entry in defaults if isinstance(defaults, list) else []:
        if isinstance(entry, str) and entry != "_self_":
            paths.append(entry.split("@")[0])  # `name@package`
        for key, value in entry.items() if isinstance(entry, dict) else ():
            if str(key).split()[0] == "optional":  # Hydra skips it where the config does not exist
                continue
            choice_group = str(key).split()[-1].split("@")[0]  # `override /model@package`
            for option in value if isinstance(value, list) else [value]:
                if option is not None and "${" not in str(option):
                    paths.append(f"{choice_group}/{option}")
    return [tuple(_from_top(group, path).rpartition("/")[::2]) for path in paths]


def _from_top(group: str, path: str) -> str:
    """A path in the defaults list of a file in `group/`, from the top of the config folders: `small` in model/ ->
    `model/small`, `/model` -> `model`."""
    return (path if path.startswith("/") else f"{group}/{path}").lstrip("/")


def _group_entries(group: str, defaults: Any) -> list[tuple[str, str]]:
    """The `group: option` entries of the defaults list of a file in `group/` ("" for a primary config), each with the
    group it chooses from the top of the config folders and as written (`override /model: tiny` -> model), `null`
    options included; another package's (`model@extra: tiny`) are left out, a second choice of a group there."""
    entries = []
    for entry in defaults if isinstance(defaults, list) else []:
        for key, value in entry.items() if isinstance(entry, dict) else ():
            name = str(key).split()[-1]
            if "@" not in name:
                entries.append((_from_top(group, name), f"{key}: {'null' if value is None else value}"))
    return entries


def _option_config(folders: tuple[Path, ...], group: str, option: str) -> dict[str, Any]:
    """The settings `group/option.yaml` sets at its own level: a global experiment's whole body, a preset's keys."""
    path = _config_file(folders, f"{group}/{option}")
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        body = OmegaConf.to_container(OmegaConf.create(text)) if text.strip() else {}
    except (OSError, UnicodeDecodeError, ValueError, OmegaConfBaseException):
        return {}
    if not isinstance(body, dict) or (group == "experiment" and "@package _global_" not in text):
        return {}
    return body


# `${key}` or `${resolver:arguments}` in a value, not escaped as `\${`; the innermost of nested ones
INTERPOLATION = re.compile(r"(?<!\\)\$\{([^${}]*)\}")


def _check_interpolations(arg: str, values: list[Any]) -> None:
    """Refuse an interpolation that names no setting (`${optim.nope}`), an unknown resolver or an environment variable
    that is not set, which Hydra would report with a traceback once the run starts."""
    for value in values:
        for text in _strings(value):
            for body in INTERPOLATION.findall(text):
                problem = _interpolation_problem(body.strip())
                if problem:
                    raise FluxtrainError(f"{arg}: ${{{body}}} {problem}")


def _interpolation_problem(body: str) -> str | None:
    if ":" in body:
        name, _, argument = body.partition(":")
        if not OmegaConf.has_resolver(name.strip()):
            return f"uses {name.strip()!r}, which is no resolver (e.g. now, oc.env)"
        variable = argument.strip()
        if name.strip() == "oc.env" and "," not in variable and variable not in os.environ:
            return f"reads the environment variable {variable}, which is not set (a default: ${{oc.env:{variable},x}})"
        return None
    if body.startswith(".") or body.split(".")[0] == "hydra":
        return None
    unknown = unknown_keys(nested(body.split("."), None), Config())
    if not unknown:
        return None
    name, close = unknown[0]
    return f"refers to {name}, which is not a fluxtrain setting" + (f" (did you mean {close}?)" if close else "")


def _strings(value: Any) -> list[str]:
    """The strings in an override's value, also inside lists and dicts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


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


def _option_values(args: list[str], names: tuple[str, ...]) -> list[str]:
    """The values of the option `names` (`--config-dir DIR`, `-cd DIR` or `--config-dir=DIR`), in order."""
    found = []
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            found.append(args[i + 1])
        elif arg.startswith(tuple(f"{name}=" for name in names)):
            found.append(arg.partition("=")[2])
    return found


def _extra_config_dirs(args: list[str]) -> list[Path]:
    """The folders given with `--config-dir DIR` (or `-cd DIR`, `--config-dir=DIR`): their config groups count too.
    One that is not a folder is an error (Hydra's own report takes three lines)."""
    found = [Path(f).expanduser() for f in _option_values(args, ("--config-dir", "-cd"))]
    for folder in found:
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise FluxtrainError(f"--config-dir {folder} {what}")
    return found


def _check_config_name(args: list[str], folders: tuple[Path, ...]) -> None:
    """`--config-name NAME` names a primary config: NAME.yaml in conf/ or the `--config-dir`."""
    if _option_values(args, ("--config-path", "-cp")):
        return  # another primary config folder: Hydra looks there
    for name in _option_values(args, ("--config-name", "-cn")):
        stem = name.removesuffix(".yaml")
        stored = f"{stem}.yaml" in ConfigStore.instance().repo  # a structured config (base_config)
        if not stored and not any((folder / f"{stem}.yaml").is_file() for folder in folders):
            where = " or ".join(str(folder) for folder in folders)
            raise FluxtrainError(f"--config-name {name}: there is no {stem}.yaml in {where}")
