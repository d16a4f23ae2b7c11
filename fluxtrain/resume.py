"""Checkpoints in a run folder: their names, the newest one, pruning, and what a resumed run may change."""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import shlex
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fluxtrain.checkpoint import Checkpoint, load_checkpoint
from fluxtrain.errors import FluxtrainError
from fluxtrain.files import TEMP_FILE
from fluxtrain.overrides import path_override
from fluxtrain.tokenizer import Tokenizer, tokenizer_from_json

log = logging.getLogger("fluxtrain")

CHECKPOINT_DIR = "checkpoints"
SUPERSEDED_DIR = "superseded"
TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer, beside its checkpoints folder
CHECKPOINT_NAME = re.compile(r"iter_(\d+)\.ckpt")
EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")  # TensorBoard's: the second it was opened, first
EVENT_FILES = "events.out.tfevents.*"
CHECKPOINT_FILES = "iter_*.ckpt"
MODEL_KEYS_FREE_ON_RESUME = ("dropout",)  # model settings that do not change the weights' meaning
DATA_KEYS_NOT_TEXT = ("cache_dir", "cache")  # data settings that do not change the text a run is evaluated on
PRIMARY_CONFIG = "config"  # `python -m fluxtrain`'s primary config (conf/config.yaml)


def checkpoint_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"iter_{iteration:06d}.ckpt"


def checkpoint_run_dir(path: Path) -> Path | None:
    """The run folder a checkpoint file sits in (`<run>/checkpoints/iter_*.ckpt`), or None elsewhere."""
    return path.resolve().parent.parent if path.parent.name == CHECKPOINT_DIR else None


def check_checkpoint_folder(run_dir: str | Path) -> None:
    """Refuse a run folder whose `checkpoints` is not a folder: no checkpoint could be found or written there."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if folder.exists() and not folder.is_dir():
        raise FluxtrainError(
            f"{folder} is a file, not a folder: a run keeps its checkpoints there "
            "(move the file away, or choose another hydra.run.dir)"
        )


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the run folder's checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return sorted(found)


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest iteration in the run folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def stale_temporary_files(run_dir: str | Path, outputs: tuple[str, ...] = ()) -> list[Path]:
    """The temporary files of atomic writes of the run's checkpoints, tokenizer and `outputs` (file name patterns:
    its model files, its metrics) in `run_dir`; other files, whatever their names, are not the run's."""
    run_dir = Path(run_dir)
    found = []
    for folder, patterns in ((run_dir / CHECKPOINT_DIR, (CHECKPOINT_FILES,)), (run_dir, (*outputs, TOKENIZER_FILE))):
        if folder.is_dir():
            found += [
                p
                for p in sorted(folder.iterdir())
                if (m := TEMP_FILE.fullmatch(p.name)) and any(fnmatch.fnmatchcase(m[1], pat) for pat in patterns)
            ]
    return found


def prune(run_dir: str | Path, keep_last: int, outputs: tuple[str, ...] = (), dead_writes: bool = True) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all) and, with `dead_writes`, the temporary files
    of dead writes of checkpoints, tokenizer and `outputs` (file name patterns); returns what went.

    Only the process that writes the run's files may call this, between writes: any temporary file present then is
    a dead write's. Those come from an earlier process, killed while it wrote: once a session has removed them, its
    later calls need not look again (a look lists the whole folder, model files included).
    """
    removed = stale_temporary_files(run_dir, outputs) if dead_writes else []
    if keep_last > 0:
        removed += [p for _, p in list_checkpoints(run_dir)[:-keep_last]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def move_to_superseded(run_dir: str | Path, paths: list[Path]) -> list[Path]:
    """Move `paths` into a new numbered folder checkpoints/superseded/NNN/ (001, 002, ...), so that no earlier set
    aside is overwritten; returns where they went."""
    if not paths:
        return []
    root = Path(run_dir) / CHECKPOINT_DIR / SUPERSEDED_DIR
    root.mkdir(parents=True, exist_ok=True)
    number = max((int(p.name) for p in root.iterdir() if p.name.isdigit()), default=0) + 1
    folder = root / f"{number:03d}"
    folder.mkdir()  # fails rather than mixing with a folder another process made just now
    return [p.replace(folder / p.name) for p in paths]


def set_aside_later(run_dir: str | Path, iteration: int, results: list[Path] | None = None) -> list[Path]:
    """Move checkpoints after `iteration`, a future the resumed run replaces, and `results` (the files of the run
    written after that point, or that the resumed run writes again) into one new checkpoints/superseded/NNN/."""
    later = [p for it, p in list_checkpoints(run_dir) if it > iteration]
    results = results or []
    moved = move_to_superseded(run_dir, later + results)
    if moved:
        files = f" and {', '.join(p.name for p in results)}" if results else ""
        # Later checkpoints are a future given up; the results alone are a finished session's, written again.
        (log.warning if later else log.info)(
            f"resuming at iteration {iteration}: moved {len(later)} later checkpoint(s){files} to {moved[0].parent}"
        )
    return moved


def set_aside_earlier_run(
    run_dir: str | Path, outputs: tuple[str, ...], resume: Path | None = None, inputs: tuple[Path, ...] = ()
) -> list[Path]:
    """Move an earlier run's checkpoints, tokenizer, TensorBoard events and `outputs` (file name patterns: its model
    files, its metrics), which a fresh run in the same folder replaces, or a run that continues the checkpoint
    `resume` of another run there, into checkpoints/superseded/NNN/, so none of them passes for the new run's and
    its curves stay apart from the new ones. `inputs`, files this run reads (its tokenizer.path), stay."""
    checkpoints = [p for _, p in list_checkpoints(run_dir)]
    patterns = (*outputs, TOKENIZER_FILE, EVENT_FILES)
    kept = {p.resolve() for p in inputs}
    others = [p for pat in patterns for p in sorted(Path(run_dir).glob(pat)) if p.resolve() not in kept]
    moved = move_to_superseded(run_dir, checkpoints + others)
    if moved:
        folder = moved[0].parent
        then = f"continuing {resume} in it" if resume else "starting afresh"
        if not checkpoints:
            names = ", ".join(p.name for p in others)
            log.warning(f"{run_dir} holds an earlier run's files: moved {names} to {folder} and {then}")
            return moved
        # Not here: continued in this folder, its checkpoints and curves would mix with the new run's.
        where = f"{path_override('resume', folder / checkpoints[-1].name)} and another hydra.run.dir"
        log.warning(
            f"{run_dir} holds an earlier run: moved its {len(checkpoints)} checkpoint(s) and {len(others)} result, "
            f"tokenizer and event file(s) to {folder} and {then} (to continue that run instead, add {where})"
        )
    return moved


def wait_for_a_later_event_file_name(run_dir: str | Path) -> None:
    """Make sure an event file opened now sorts after the ones already in `run_dir`.

    TensorBoard reads a folder's event files in name order, and a name starts with the whole second it was opened
    in, then a per-process counter that does not sort as a number (9 after 10). A session that resumes within the
    same second as an earlier one (tiny runs do) waits for the next second, so its purge and its events come after.
    """
    stamps = [int(m[1]) for p in Path(run_dir).glob(EVENT_FILES) if (m := EVENT_FILE.match(p.name))]
    if stamps and max(stamps) >= int(time.time()):
        time.sleep(max(stamps) + 1 - time.time())


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint that `resume=` names: None (fresh start), `auto` (newest in the run folder, if any) or a path."""
    check_checkpoint_folder(run_dir)  # every run writes checkpoints there: refused before any work
    if resume is None:
        return None
    if resume == "auto":
        latest = find_latest(run_dir)
        if latest is None:
            log.info(f"resume=auto: no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}, starting a fresh run")
        return latest
    path = Path(resume).expanduser()
    if path.is_dir():
        run = path.parent if path.name == CHECKPOINT_DIR else path
        latest = find_latest(run)
        if latest is None:
            raise FluxtrainError(
                f"resume={resume} is a folder with no checkpoint in {run / CHECKPOINT_DIR} (give a .ckpt file)"
            )
        raise FluxtrainError(
            f"resume={resume} is a folder, not a checkpoint file: to continue the run in it, use "
            f"{path_override('hydra.run.dir', run)} resume=auto, or {path_override('resume', latest)} "
            "(its newest checkpoint)"
        )
    if not path.is_file():
        raise FluxtrainError(f"resume={resume}: no such checkpoint file (give a .ckpt file, or resume=auto)")
    return path


def setting_differences(
    saved: dict[str, Any], current: dict[str, Any], prefix: str, ignore=(), saved_in: str = "checkpoint"
) -> list[str]:
    """Each setting of section `prefix` whose value now differs from the one `saved_in` a file, both named:
    `model.d_model=64 (checkpoint: 32)`; the keys `ignore` aside."""
    keys = sorted((saved.keys() | current.keys()) - set(ignore))
    missing = "(unset)"
    return [
        f"{prefix}.{k}={current.get(k, missing)} ({saved_in}: {saved.get(k, missing)})"
        for k in keys
        if saved.get(k, missing) != current.get(k, missing)
    ]


def foreign_evaluations(ckpt: Checkpoint, cfg: DictConfig, run_dir: Path) -> str | None:
    """Why the evaluations a checkpoint holds (its best val loss, its last evaluation) are not the resuming run's:
    the checkpoint is another folder's, whose best model file this folder lacks, or the data settings changed, so
    they scored another validation text. None when they are the run's own."""
    if checkpoint_run_dir(ckpt.path) != Path(run_dir).resolve():
        return "the checkpoint is another run folder's"
    saved, current = ckpt.config.get("data", {}), OmegaConf.to_container(cfg.data, resolve=True)
    saved, current = _data_paths_absolute(saved), _data_paths_absolute(current)
    if changed := setting_differences(saved, current, "data", DATA_KEYS_NOT_TEXT):
        return f"the data changed ({'; '.join(changed)})"
    return None


def _data_paths_absolute(data: dict[str, Any]) -> dict[str, Any]:
    """Data settings with `path` and `val_path` as absolute paths (from the working folder, as the run reads them),
    so that `data.path=texts/a.txt` and `data.path=./texts/a.txt` name the same text."""
    paths = {key: data.get(key) for key in ("path", "val_path")}
    return {**data, **{k: os.path.abspath(os.path.expanduser(v)) for k, v in paths.items() if isinstance(v, str)}}


def check_compatible(ckpt: Checkpoint, cfg: DictConfig) -> None:
    """Refuse a resume that changes the model's shape or the tokenizer, naming every differing key."""
    current = OmegaConf.to_container(cfg, resolve=True)
    diffs = setting_differences(asdict(ckpt.model_config), current["model"], "model", MODEL_KEYS_FREE_ON_RESUME)
    # tokenizer.path may name the run's own tokenizer file: check_tokenizer compares what it holds.
    saved_tokenizer, tokenizer = ckpt.config.get("tokenizer", {}), current["tokenizer"]
    # tokenizer.vocab_size applies to BPE only: between a character and a BPE tokenizer, the kinds differ and say it
    both_bpe = saved_tokenizer.get("kind") == tokenizer.get("kind") == "bpe"
    # A run started with init_from keeps the model's tokenizer, whatever tokenizer.* say (init_from.kept_tokenizer).
    if ckpt.config.get("init_from") is None:
        ignored = ("path",) if both_bpe else ("path", "vocab_size")
        diffs += setting_differences(saved_tokenizer, tokenizer, "tokenizer", ignored)
    if diffs:
        raise FluxtrainError(
            f"cannot resume from {ckpt.path}: model shape or tokenizer differ: {'; '.join(diffs)} "
            "(resume with the run's original settings; length, logging, optimizer and data settings may change)"
        )
    changed = [
        d
        for section in ("train", "optim", "data")
        for d in setting_differences(ckpt.config.get(section, {}), current.get(section, {}), section)
    ]
    if changed:
        log.info(f"settings changed since the checkpoint: {'; '.join(changed)}")


def optimizer_changed(error: FluxtrainError, ckpt: Checkpoint, name: str) -> FluxtrainError:
    """`error`, which restoring `ckpt` raised, naming optim.name when the run asks for another optimizer than the
    checkpoint's (Muon's state does not fit Adam's, nor the other way round)."""
    optim = ckpt.config.get("optim")
    saved = optim.get("name") if isinstance(optim, dict) else None
    if saved == name:
        return error
    if saved is None:
        return FluxtrainError(f"{error}; this run asks for optim.name={name}, the checkpoint does not record its own")
    return FluxtrainError(
        f"{error}; the checkpoint was trained with optim.name={saved}, this run asks for optim.name={name} "
        f"(resume with optim.name={saved}, or start a fresh run to change the optimizer)"
    )


def check_tokenizer(ckpt: Checkpoint, tokenizer: Tokenizer) -> None:
    """Refuse a resume whose data and tokenizer settings now give another tokenizer than the checkpoint's."""
    if tokenizer.to_json() != ckpt.tokenizer_json:
        saved = tokenizer_from_json(ckpt.tokenizer_json)
        run = checkpoint_run_dir(ckpt.path)
        keep = ""
        if run is not None and (run / TOKENIZER_FILE).is_file():
            own = path_override("tokenizer.path", run / TOKENIZER_FILE)
            keep = f"; to train on new text with the run's tokenizer, add {own}"
        raise FluxtrainError(
            f"cannot resume from {ckpt.path}: the tokenizer built now ({tokenizer.name}, vocab {tokenizer.vocab_size}) "
            f"differs from the checkpoint's ({saved.name}, vocab {saved.vocab_size}); did data.* change?{keep}"
        )


def load_resume(cfg: DictConfig, run_dir: str | Path) -> Checkpoint | None:
    """The checkpoint to continue from, loaded and checked against `cfg`; None to start fresh."""
    path = resolve_resume(cfg.get("resume"), run_dir)
    if path is None:
        return None
    try:
        ckpt = load_checkpoint(path)
        named = CHECKPOINT_NAME.fullmatch(Path(path).name)
        if named and int(named[1]) != ckpt.progress.iteration:  # resume=auto and pruning go by the name
            raise FluxtrainError(
                f"{path} is damaged: its name says iteration {int(named[1])}, its progress {ckpt.progress.iteration}"
            )
    except FluxtrainError as e:
        older = [p for _, p in list_checkpoints(run_dir) if p != path]
        if cfg.get("resume") == "auto" and older:
            hint = f"to continue from the checkpoint before it, use {path_override('resume', older[-1])}"
            raise FluxtrainError(f"{e}; {hint}") from None
        raise
    check_compatible(ckpt, cfg)
    ckpt_run_dir = checkpoint_run_dir(path)
    if ckpt_run_dir is not None and ckpt_run_dir != Path(run_dir).resolve():
        log.warning(
            f"the checkpoint belongs to {ckpt_run_dir}; this run writes into {run_dir} "
            f"(to continue in the same folder, add {path_override('hydra.run.dir', ckpt_run_dir)})"
        )
    log.info(f"resuming from {path} at iteration {ckpt.progress.iteration}")
    return ckpt


def resume_command(run_dir: str | Path, world_size: int = 1, local_world_size: int = 1) -> str:
    """The command line that continues this run in its folder from its newest checkpoint: under torchrun with as
    many processes as now (one node), or with a note to launch it as before (several nodes). The run's
    `--config-dir` and `--config-name` come along, and its overrides (but `resume`)."""
    options, overrides = [], []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:  # the job's overrides are one point of the sweep, not its command
            sweep_dir = path_override("hydra.sweep.dir", Path(hydra_cfg.sweep.dir).resolve())
            return f"the sweep's own command (with -m) plus {sweep_dir} resume=auto"
        options = [
            word
            for source in hydra_cfg.runtime.config_sources
            if source.provider == "command-line" and source.schema == "file"  # --config-dir, made absolute
            for word in ("--config-dir", source.path)
        ]
        if hydra_cfg.job.config_name not in (None, PRIMARY_CONFIG):
            options += ["--config-name", hydra_cfg.job.config_name]
        overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")]
    launch = ["python", "-m", "fluxtrain"]
    if world_size > 1:
        launch = ["torchrun", f"--nproc_per_node={local_world_size}"]
        launch += ["--standalone"] if world_size == local_world_size else [f"--nnodes={world_size // local_world_size}"]
        launch += ["-m", "fluxtrain"]
    words = [shlex.quote(w) for w in [*launch, *options, *overrides]]
    command = " ".join([*words, path_override("hydra.run.dir", Path(run_dir).resolve()), "resume=auto"])
    if world_size > local_world_size:
        command += "  (on every node, with the rendezvous options of the first launch)"
    return command


def resume_hint(run_dir: str | Path, world_size: int = 1, local_world_size: int = 1) -> str:
    """How to continue a stopped run: its command line (`resume_command`), or for a run started from Python
    (`fluxtrain.train.train`, outside Hydra), whose settings no command line holds, the call that continues it."""
    if HydraConfig.initialized():
        return resume_command(run_dir, world_size, local_world_size)
    where = f", in a script under torchrun with {world_size} processes as before" if world_size > 1 else ""
    return f"train(compose([<the settings of the run>, 'resume=auto']), {str(run_dir)!r}) from Python{where}"


def divergence_error(what: str, iteration: int, last_checkpoint: Path | None, lr: float) -> FluxtrainError:
    """The error for a NaN/inf loss or weights: where it happened and the last good checkpoint to go back to."""
    if last_checkpoint is None:
        where = "no checkpoint was written before it"
    else:
        where = (
            f"the last good checkpoint is {last_checkpoint} (continue with {path_override('resume', last_checkpoint)})"
        )
    return FluxtrainError(
        f"{what} at iteration {iteration}; stopped without saving: {where}; try lowering optim.lr={lr}"
    )


def write_failed(
    error: FluxtrainError, run_dir: str | Path, world_size: int = 1, local_world_size: int = 1
) -> FluxtrainError:
    """The error for a file of the run that could not be written (a full disk, a read-only folder): the file, the OS
    error, and the last good checkpoint with the command that continues from it."""
    latest = find_latest(run_dir)
    if latest is None:
        return FluxtrainError(f"{error}; stopped: no checkpoint was written before it")
    command = resume_command(run_dir, world_size, local_world_size)
    return FluxtrainError(
        f"{error}; stopped: the last good checkpoint is {latest} (make room or fix the folder, then resume with: "
        f"{command})"
    )
