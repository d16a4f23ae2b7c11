"""Runs on disk: find the run folders under an outputs folder and read their config, metrics and curves.

python -m fluxtrain.runs outputs/multirun/2026-11-27/10-00-00     # one row per run, best first
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError, safe_open

from fluxtrain import host
from fluxtrain.checkpoint import checked_progress
from fluxtrain.errors import (
    FluxtrainError,
    OneLineErrorParser,
    did_you_mean,
    expand_home,
    first_line,
    paths_named,
    quiet_when_stdout_closes,
)
from fluxtrain.files import parse_json, user_path
from fluxtrain.overrides import override_key
from fluxtrain.resume import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILES,
    CHECKPOINT_NAME,
    SUPERSEDED_DIR,
    TOKENIZER_FILE,
    find_latest,
    list_checkpoints,
)
from fluxtrain.run_folder import HYDRA_OUTPUT_DIR

BEST_MODEL_FILE, FINAL_MODEL_FILE = "best.safetensors", "model_final.safetensors"
MODEL_FILES = (BEST_MODEL_FILE, FINAL_MODEL_FILE)  # a run folder's model, in order of preference
METRICS_FILE = "metrics.json"  # written when a run finishes
FAILED_FILE = "failed.json"  # written when a sweep job fails (fluxtrain.sweep)
MODEL_ITER_FILES = "model_iter_*.safetensors"  # the model at each checkpoint: model_iter_000500.safetensors
MODEL_ITER_FILE = re.compile(r"model_iter_(\d+)\.safetensors")
RUN_OUTPUTS = (*MODEL_FILES, MODEL_ITER_FILES, METRICS_FILE)  # what a run leaves beside its checkpoints
ITERATION_KEY = "iteration"  # in a run's model files' metadata: the iteration they were saved at
RANKED_METRICS = ("best_val_loss", "final_val_loss", "tokens_per_sec", "wall_time_sec")  # a comparison's columns
TOKENIZER_FROM_MODEL = "from init_from"  # the tokenizer settings of a run that kept its init_from model's
# Runs of different tokenizers rank by bits per byte: their losses per token do not compare.
RANKED_ACROSS_TOKENIZERS = ("best_val_bpb", "best_val_loss", "final_val_loss", "tokens_per_sec", "wall_time_sec")
TABLE_METRICS = (
    "final_train_loss",
    "final_val_loss",
    "best_val_loss",
    "val_perplexity",
    "val_bpb",
    "tokens_per_sec",
    "wall_time_sec",
)


@dataclass
class Run:
    path: Path
    name: str  # the path relative to the folder that was searched
    config: dict[str, Any]  # the composed config Hydra saved in .hydra/config.yaml ({} if there is none)
    overrides: list[str]  # the command-line overrides of this run
    metrics: dict[str, Any] | None  # metrics.json, None while running or when the run failed
    error: str | None  # the error of a failed sweep job (failed.json)
    # With neither: the iteration of its newest checkpoint (a run stopped, killed or still training), else None.
    unfinished_at: int | None = None
    # A file of the run that is damaged or was edited by hand, and why it cannot be read: "metrics.json: not a JSON
    # object but list". The run is still listed, with what could be read.
    unreadable: str | None = None

    def get(self, key: str) -> Any:
        """A config value by dotted key, e.g. `optim.lr`; None when absent."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def setting(self, key: str) -> Any:
        """`key` as a table shows it: the config value, or for a config group (`model`, `experiment`) the option the
        run's command line chose (`small`); None when neither. A run started with `init_from` trained with its model
        file's tokenizer, whatever its `tokenizer` settings say: those show as `from init_from`."""
        if (key == "tokenizer" or key.startswith("tokenizer.")) and self.get("init_from") is not None:
            return TOKENIZER_FROM_MODEL
        value = self.get(key)
        if isinstance(value, dict) or (value is None and key not in flat_settings(self.config)):
            return override_value(self.overrides, key)
        return value

    def model_file(self) -> Path:
        path = run_model_file(self.path)
        if path is None:
            raise FileNotFoundError(f"{self.path} holds no model file ({', '.join(MODEL_FILES)})")
        return path


def override_value(overrides: list[str], key: str) -> str | None:
    """The value the last of `overrides` naming `key` gives it (`model=small`, `++optim.lr=1e-3`,
    `model@pkg=small`), as written; None when none names it."""
    for override in reversed(overrides):
        name, sep, value = override.partition("=")
        if sep and override_key(name) == key:
            return value
    return None


def run_model_file(run_dir: Path) -> Path | None:
    """The run folder's best model file, else its final one; None when it has neither."""
    return next((run_dir / name for name in MODEL_FILES if (run_dir / name).is_file()), None)


def in_job_order(paths, root: Path) -> list[Path]:
    """`paths` under `root` sorted folder by folder, numbered ones (sweep jobs) by number: job 10 after job 9."""
    return sorted(
        paths,
        key=lambda p: [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.relative_to(root).parts],
    )


def written_since(root: Path, pattern: str, since: float) -> list[Path]:
    """The files under `root` matching `pattern` written at or after time `since`, in job order."""

    def recent(path: Path) -> bool:
        try:
            return path.stat().st_mtime >= since
        except FileNotFoundError:  # removed since it was listed: a running run prunes its checkpoints
            return False

    return in_job_order((p for p in root.rglob(pattern) if recent(p)), root)


def model_iter_file(iteration: int) -> str:
    """The name of the model file written with the checkpoint of `iteration`."""
    return f"model_iter_{iteration:06d}.safetensors"


def load_metrics(file: Path) -> dict[str, Any]:
    """A metrics.json: an object whose table columns are numbers or null (ValueError if not)."""
    metrics = parse_json(file.read_text())
    if not isinstance(metrics, dict):
        raise ValueError(f"not a JSON object but {type(metrics).__name__}")
    for key in dict.fromkeys((*TABLE_METRICS, *RANKED_ACROSS_TOKENIZERS, "vocab_size")):
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{key}={json.dumps(value)} is not a number")
    iters = metrics.get("iters")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
        raise ValueError(f"iters={json.dumps(iters)} is not an iteration count")
    return metrics


def load_failure(file: Path) -> tuple[str, list[str] | None]:
    """The error message in a failed.json and the job's overrides (None where it lacks them); ValueError if it has
    no message."""
    report = parse_json(file.read_text())
    if not isinstance(report, dict) or not isinstance(report.get("error"), str):
        raise ValueError('no "error" message')
    overrides = report.get("overrides")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        overrides = None
    return report["error"], overrides


def with_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`config` with the values that `overrides` give its settings (`optim.lr=1e-3`); group choices (`model=small`)
    and keys it lacks are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    config = copy.deepcopy(config)
    parser = OverridesParser.create()
    for line in overrides:
        try:
            (override,) = parser.parse_overrides([line])
            value = override.value()
        except (HydraException, ValueError, RecursionError):  # RecursionError: brackets nested past Python's limit
            continue
        *parents, leaf = override.key_or_group.split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and not isinstance(node[leaf], dict):
            node[leaf] = value
    return config


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file (a model file or a checkpoint), without reading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def saved_iteration(path: Path) -> int | None:
    """The training iteration a model file (a run's record it) or a checkpoint (its progress holds it) was saved at;
    None where the file does not say."""
    meta = read_metadata(path)
    if "progress" in meta:
        try:
            return checked_progress(parse_json(meta["progress"]), str(path)).iteration
        except ValueError:  # damaged: resuming from it names the problem
            return None
    value = meta.get(ITERATION_KEY, "")
    return int(value) if value.isdecimal() else None


def model_file_label(path: Path, iteration: int | None) -> str:
    """The model file `path` as commands name what they read, with the `iteration` it was saved at where known."""
    return str(path) if iteration is None else f"{path} (iteration {iteration})"


def results_after(run_dir: Path, iteration: int, checkpoint: Path) -> list[Path]:
    """The results in `run_dir` written after `iteration`, where a run resumes from its `checkpoint`: the final model
    file and metrics.json of a run that ended later (those of a run that ended at `iteration` describe the
    checkpoint's own state and stay; `read_run` reads them as unfinished once a later checkpoint exists), and the
    model files saved after `iteration`. The best model file records its iteration; one saved by an earlier version
    counts as later when it is newer than the checkpoint."""
    results = []
    if (run_dir / FINAL_MODEL_FILE).is_file() or (run_dir / METRICS_FILE).is_file():
        try:
            ended_later = load_metrics(run_dir / METRICS_FILE).get("iters") != iteration
        except (OSError, ValueError, FluxtrainError):  # missing or damaged: nothing says where it ended
            ended_later = True
        if ended_later:
            results = [run_dir / name for name in (FINAL_MODEL_FILE, METRICS_FILE) if (run_dir / name).is_file()]
    results += [
        p
        for p in sorted(run_dir.glob(MODEL_ITER_FILES))
        if (m := MODEL_ITER_FILE.fullmatch(p.name)) and int(m[1]) > iteration
    ]
    best = run_dir / BEST_MODEL_FILE
    if best.is_file():
        try:
            saved_at = saved_iteration(best)
        except (SafetensorError, OSError):  # unreadable: no record
            saved_at = None
        if saved_at is None:
            later = best.stat().st_mtime > checkpoint.stat().st_mtime
        else:
            later = saved_at > iteration
        if later:
            results.append(best)
    return results


class _SavedYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Hydra's saved YAML read as OmegaConf reads it (`1e-3` is a float, as in YAML 1.2; a date stays text), by
    libyaml where PyYAML has it: about ten times faster than OmegaConf.load, for run folders by the hundred."""


_SavedYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SavedYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(  # OmegaConf's: YAML 1.2's floats, 1e-3 among them, where YAML 1.1 needs a dot
        r"""^(?:
         [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
        |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
        |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_saved_yaml(file: Path) -> Any:
    with open(file, encoding="utf-8") as f:
        return yaml.load(f, Loader=_SavedYamlLoader)


def load_saved_config(file: Path) -> dict[str, Any]:
    """A run's .hydra/config.yaml: a mapping of its settings (ValueError if not)."""
    config = load_saved_yaml(file)
    if not isinstance(config, dict):
        raise ValueError(f"not a mapping of settings but {type(config).__name__}")
    return config


def load_saved_overrides(file: Path) -> list[str]:
    """A run's .hydra/overrides.yaml: the overrides of its command line, a list of texts (ValueError if not)."""
    overrides = load_saved_yaml(file)
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError("not a list of overrides such as optim.lr=1e-3")
    return overrides


def read_run(path: Path, root: Path) -> Run:
    unreadable: list[str] = []

    def read(name: str, load):
        file = path / name
        if not file.is_file():
            return None
        try:
            return load(file)
        except (OSError, ValueError, KeyError, TypeError, RecursionError, yaml.YAMLError) as e:
            unreadable.append(f"{name}: {first_line(e)}")  # damaged or edited by hand
            return None

    config = read(f"{HYDRA_OUTPUT_DIR}/config.yaml", load_saved_config) or {}
    overrides = read(f"{HYDRA_OUTPUT_DIR}/overrides.yaml", load_saved_overrides) or []
    metrics = read(METRICS_FILE, load_metrics)
    error, failed_overrides = read(FAILED_FILE, load_failure) or (None, None)
    if error is not None:
        # A sweep job removes its failed.json when it starts: the failure is newer than any results of an earlier
        # sweep in the folder, and a job refused at setup put that sweep's config back, so the job's own overrides
        # name its settings.
        metrics = None
        if failed_overrides is not None:
            overrides, config = failed_overrides, with_overrides(config, failed_overrides)
    name = str(path.relative_to(root)) if path != root else path.resolve().name  # `.` is named too
    unfinished_at = None
    if error is None and (checkpoints := list_checkpoints(path)):
        at = checkpoints[-1][0]  # the newest checkpoint's iteration, from its name
        if metrics is None or not latest_results(metrics, at, config):  # no results yet, or an earlier session's
            unfinished_at, metrics = at, None
    return Run(path, name, config, overrides, metrics, error, unfinished_at, unreadable[0] if unreadable else None)


def latest_results(metrics: dict[str, Any], newest: int, config: dict[str, Any]) -> bool:
    """Whether a run folder's metrics.json holds the results of its latest session, whose config Hydra saved: not
    when a checkpoint after them exists, nor when that session was resumed with a larger train.max_iters and no time
    budget and has not ended (it is still training, or was killed before its first checkpoint)."""
    ended_at = metrics.get("iters")
    if ended_at is None:  # nothing says where the run ended
        return True
    if newest > ended_at:
        return False
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    max_iters = train.get("max_iters")
    if train.get("max_time") is not None or not isinstance(max_iters, int) or isinstance(max_iters, bool):
        return True  # a time budget may end a run before its max_iters
    return ended_at >= max_iters


def run_folders(root: Path, since: float = 0.0) -> list[Path]:
    """The folders under `root` (or `root` itself) where a run wrote its metrics.json or a checkpoint, or a failed
    sweep job its failed.json, at or after time `since`; in job order. An earlier run's files that a fresh run in its
    folder set aside (checkpoints/superseded/NNN/) are not a run of their own."""
    found = {p.parent for name in (METRICS_FILE, FAILED_FILE) for p in written_since(root, name, since)}
    checkpoints = written_since(root, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILES}", since)
    found |= {p.parent.parent for p in checkpoints if CHECKPOINT_NAME.fullmatch(p.name)}
    return in_job_order((p for p in found if not is_set_aside(p)), root)


def is_set_aside(folder: Path) -> bool:
    """Whether `folder` is checkpoints/superseded/NNN/ (or checkpoints/superseded/ itself, as earlier versions laid
    it out): runs set aside, not runs to list."""
    return any(f.name == SUPERSEDED_DIR and f.parent.name == CHECKPOINT_DIR for f in (folder, folder.parent))


def find_runs(root: str | Path) -> list[Run]:
    """Every run folder under `root` (or `root` itself): finished ones hold metrics.json, failed ones failed.json,
    unfinished ones (stopped, killed, or still training) checkpoints alone."""
    root = user_path(root, "runs folder", file=False)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    return [read_run(path, root) for path in run_folders(root)]


def flat_settings(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: {"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def varying_keys(runs: list[Run]) -> list[str]:
    """The config groups chosen differently on the runs' command lines (`model=small` against `model=medium`), then
    the settings whose values are not the same in every one of `runs` (a key some runs lack counts), sorted. Runs
    without a readable config (damaged, or a sweep with hydra.output_subdir=null) are left out of the comparison."""
    groups = sorted({key for run in runs for key in override_keys(run.overrides) if "." not in key})
    varying = [g for g in groups if len({run.setting(g) for run in runs}) > 1]
    configured = [run for run in runs if run.config]
    keys = sorted({key for run in configured for key in flat_settings(run.config)})
    return varying + [key for key in keys if len({repr(run.setting(key)) for run in configured}) > 1]


def override_keys(overrides: list[str]) -> set[str]:
    """The settings and groups that `overrides` name (`model=small` -> model, `++optim.lr=1e-3` -> optim.lr)."""
    return {override_key(o.partition("=")[0]) for o in overrides if "=" in o}


def runs_table(
    runs: list[Run],
    keys: tuple[str, ...] = ("model.d_model", "model.n_layers", "optim.lr", "model.dropout"),
    metrics: tuple[str, ...] = TABLE_METRICS,
) -> list[dict[str, Any]]:
    """One row per run: its name, chosen config values, final metrics, and the error if it failed."""
    keys, metrics = ((names,) if isinstance(names, str) else names for names in (keys, metrics))  # one, as text
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name}
        row.update({key: run.setting(key) for key in keys})
        row.update({m: (run.metrics or {}).get(m) for m in metrics})
        if run.unreadable:
            row["status"] = "unreadable " + run.unreadable
        elif run.error:
            row["status"] = "failed: " + run.error
        elif run.metrics:
            row["status"] = "ok"
        elif run.unfinished_at is not None:
            row["status"] = f"unfinished (iter {run.unfinished_at})"
        else:
            row["status"] = "no metrics"
        rows.append(row)
    return rows


def ranked_table(runs: list[Run], keys: list[str]) -> str:
    """`runs` as a table: their `keys` settings and metrics, best first by the first metric column (`ranked_by`),
    failed and unfinished runs last."""
    by = ranked_by(runs)
    ranked = sorted(runs, key=lambda run: rank_value(ranking_figure(run, by)))
    metrics = RANKED_METRICS if by == "best_val_loss" else RANKED_ACROSS_TOKENIZERS
    return format_table(runs_table(ranked, keys=tuple(keys), metrics=metrics))


def best_runs(runs: list[Run], n: int | None = None) -> list[Run]:
    """The finished runs among `runs` (those with results), best first by `ranked_by` (a missing or NaN figure
    last); the first `n` of them."""
    finished = [run for run in runs if run.metrics]
    by = ranked_by(finished)
    return sorted(finished, key=lambda run: rank_value(ranking_figure(run, by)))[:n]


def ranked_by(runs: list[Run]) -> str:
    """The figure that ranks `runs`: the best validation loss, or, when the finished ones were trained with different
    tokenizers (their saved tokenizer.json files differ), the best validation bits per byte, since losses per token
    of different tokenizers do not compare."""
    tokenizers = {tokenizer_digest(run.path) for run in runs if run.metrics} - {None}
    return "best_val_loss" if len(tokenizers) <= 1 else "best_val_bpb"


def ranking_figure(run: Run, by: str) -> float | None:
    """The figure `by` of a finished run; for a run written before `best_val_bpb` was recorded, its final bpb."""
    metrics = run.metrics or {}
    return metrics.get("val_bpb") if by == "best_val_bpb" and "best_val_bpb" not in metrics else metrics.get(by)


def tokenizer_digest(run_dir: Path) -> str | None:
    """A digest of the tokenizer a run saved in its folder (tokenizer.json), None where it has none."""
    try:
        return hashlib.sha256((run_dir / TOKENIZER_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def rank_value(loss: float | None) -> float:
    """A loss as a sort key: a missing or NaN one ranks last, with the failed and unfinished runs."""
    return math.inf if loss is None or math.isnan(loss) else loss


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a plain-text table with aligned columns; floats in 4 significant digits, from 10,000 up as whole
    numbers with thousands separators (tokens/s)."""
    if not rows:
        return "(no runs)"

    def cell(value: Any) -> str:
        if isinstance(value, float):
            short = f"{value:.4g}"  # 9999.7 -> 1e+04: a whole number then, unless too large to read as one (1e+30)
            return f"{value:,.0f}" if (abs(value) >= 1e4 or "e+" in short) and abs(value) < 1e15 else short
        text = "-" if value is None else str(value)
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # a newline as \\n: one line per row

    columns = list(rows[0])
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [columns, *cells]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def read_scalars(run_dir: str | Path, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of one scalar curve from a run's TensorBoard event files; empty if the tag is absent."""
    run_dir = user_path(run_dir, "run folder", file=False)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # for the notebook only

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    tensorboard_log = logging.getLogger("tensorboard")
    level = tensorboard_log.level
    # A resumed run hides the events its stopped session logged after the checkpoint, as intended; TensorBoard's
    # reader would warn of steps "out of order" for each such run.
    tensorboard_log.setLevel(logging.ERROR)
    try:
        events.Reload()
    finally:
        tensorboard_log.setLevel(level)
    if tag not in events.Tags()["scalars"]:
        return [], []
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def resolve_model_path(name: str | Path, setting: str = "MODEL") -> Path:
    """MODEL on a command line (generate, evaluate, export), or the setting `init_from`: a model file, a checkpoint,
    or a run folder (its best model, else its final one, else its newest checkpoint)."""
    if not str(name).strip():
        raise FluxtrainError(f"{setting} is empty (give a model file, a checkpoint or a run folder)")
    path = expand_home(name, _named(setting, name))
    if path.is_dir():
        found = run_model_file(path) or find_latest(path)
        if found is None:
            raise FluxtrainError(not_a_run_folder(path, setting))
        return found
    if not path.exists():
        raise FluxtrainError(
            f"{_named(setting, path)} does not exist (give a model file, a checkpoint or a run folder)"
        )
    return path


def _named(setting: str, path: str | Path) -> str:
    """A path as errors name it: `MODEL path` for a command's argument, `init_from=path` for a setting."""
    return f"{setting} {path}" if setting.isupper() else f"{setting}={path}"


def not_a_run_folder(path: Path, setting: str = "MODEL") -> str:
    """Why the folder `path` names no model: a folder of checkpoints (named with its newest one), or no run folder."""
    try:
        entries = list(path.iterdir())
    except OSError:
        entries = []
    checkpoints = sorted((int(m.group(1)), p) for p in entries if (m := CHECKPOINT_NAME.fullmatch(p.name)))
    if checkpoints:
        run = f" or the run folder {path.parent}" if path.name == CHECKPOINT_DIR else ""
        return (
            f"{_named(setting, path)} is a folder of checkpoints, not a run folder: give one of its checkpoints (the "
            f"newest is {checkpoints[-1][1]}){run}"
        )
    return (
        f"{_named(setting, path)} is a folder that holds no model file ({' or '.join(MODEL_FILES)}) and no "
        f"{CHECKPOINT_DIR}/{CHECKPOINT_FILES}: give a model file, a checkpoint or a run folder"
    )


def compare(folder: str, keys_text: str | None = None) -> str:
    """The comparison table of the runs under `folder`, with the settings `keys_text` names (comma-separated), or
    those that differ between the runs."""
    runs = find_runs(folder)
    if not runs:
        raise FluxtrainError(
            f"no runs under {folder} (a run folder holds {METRICS_FILE}, {FAILED_FILE} "
            f"or {CHECKPOINT_DIR}/{CHECKPOINT_FILES})"
        )
    keys = [key.strip() for key in keys_text.split(",")] if keys_text is not None else varying_keys(runs)
    if keys_text is not None:
        if not keys_text.strip():
            raise FluxtrainError(
                "--keys is empty: name settings separated by commas, e.g. optim.lr,model.d_model (leave it out "
                "for those that differ between runs)"
            )
        if "" in keys:
            raise FluxtrainError(f"--keys {keys_text!r} has an empty name; separate settings by single commas")
        known = {key for run in runs for key in (*flat_settings(run.config), *override_keys(run.overrides))}
        unknown = [key for key in keys if key not in known]
        if unknown:
            raise FluxtrainError(f"--keys: no run has the setting {unknown[0]}{did_you_mean(unknown[0], known)}")
    return ranked_table(runs, keys)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the command, not a call from Python
        host.collect_less()
    p = OneLineErrorParser(
        prog="python -m fluxtrain.runs",
        description=(
            "Compare runs: one row per run folder under FOLDER, best first (by best val loss, or by best val bits per "
            "byte when their tokenizers differ)."
        ),
    )
    p.add_argument(
        "folder",
        metavar="FOLDER",
        nargs="?",
        default="outputs",
        help="a run, a sweep or a folder of them (default: outputs)",
    )
    p.add_argument(
        "--keys",
        help="comma-separated settings to show, e.g. optim.lr,model.d_model (default: those that differ between runs)",
    )
    with quiet_when_stdout_closes():
        args = p.parse_args(argv)
        try:
            with paths_named():
                print(compare(args.folder, args.keys))
        except (FluxtrainError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
