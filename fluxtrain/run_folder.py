"""A run's folder before the run claims it: the folder given on the command line is checked before Hydra writes into
it, Hydra's config files there are kept, so that a run refused at setup leaves the folder as it was, and a run holds
a lock on its folder while it runs."""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from fluxtrain.errors import FluxtrainError
from fluxtrain.files import atomic_write, check_writable
from fluxtrain.overrides import hydra_override, hydra_value, is_multirun, runs_nothing

log = logging.getLogger("fluxtrain")

# A run refused at setup leaves its folder as it was, Hydra's saved config included: Hydra writes `.hydra/` before
# the run starts, so the command line keeps the earlier files here and puts them back unless the run claims the folder;
# a folder made for the refused run is removed.
HYDRA_OUTPUT_DIR = ".hydra"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra saves in HYDRA_OUTPUT_DIR
_earlier_run_configs: dict[Path, dict[str, bytes]] = {}
_claimed: set[Path] = set()


def remember_run_configs(folder: str | Path, sweep: bool = False) -> None:
    """Keep the Hydra config files of the run folder `folder` (or with `sweep`, of every job folder under it) as they
    are before this run, for `restore_run_config`."""
    folder = Path(folder).expanduser().resolve()
    if sweep:
        run_dirs = [p.parent for p in folder.rglob(HYDRA_OUTPUT_DIR) if p.is_dir()] if folder.is_dir() else []
    else:
        run_dirs = [folder] if folder.is_dir() else []
    for run_dir in run_dirs:
        _earlier_run_configs[run_dir] = hydra_files(run_dir)


def hydra_files(run_dir: Path) -> dict[str, bytes]:
    """The Hydra config files in the run folder `run_dir` (`.hydra/`), by name."""
    return {p.name: p.read_bytes() for p in (run_dir / HYDRA_OUTPUT_DIR).glob("*") if p.is_file()}


def put_back_hydra_files(run_dir: Path, saved: dict[str, bytes]) -> None:
    """Make `run_dir`'s Hydra config files `saved` (`hydra_files`) again: Hydra replaces them before a run starts."""
    hydra_dir = run_dir / HYDRA_OUTPUT_DIR
    try:
        for path in hydra_dir.glob("*"):
            if path.name not in saved and path.is_file():
                path.unlink()  # saved by this run alone
        for name, content in saved.items():
            if not (hydra_dir / name).is_file() or (hydra_dir / name).read_bytes() != content:
                atomic_write(hydra_dir / name, lambda tmp, content=content: tmp.write_bytes(content))
        if not saved and hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()
    except OSError as e:
        log.warning(f"could not put back the earlier config files in {hydra_dir}: {e}")


def claim_run_config(run_dir: str | Path) -> None:
    """The run has claimed `run_dir`: the Hydra config files it saved there are the folder's now."""
    _claimed.add(Path(run_dir).resolve())


def restore_run_config(run_dir: str | Path) -> None:
    """Put back the Hydra config files `run_dir` had before this run, which Hydra replaced before the run was refused;
    nothing once the run has claimed the folder."""
    saved = _earlier_run_configs.get(Path(run_dir).resolve())
    if saved is None or Path(run_dir).resolve() in _claimed:
        return
    put_back_hydra_files(Path(run_dir), saved)


def given_output_dir(args: list[str]) -> tuple[str, str] | None:
    """The setting and the value the command line gives Hydra's output folder (`hydra.sweep.dir` with -m, else
    `hydra.run.dir`), or None where Hydra chooses it or does not run."""
    if runs_nothing(args):  # they write nothing
        return None
    setting = "hydra.sweep.dir" if is_multirun(args) else "hydra.run.dir"
    given = [arg for arg in args if arg.startswith(f"{setting}=")]
    if not given:
        return None
    value = hydra_value(given[-1])
    return None if value is None else (setting, str(value))  # None: Hydra reports it


def discard_refused(run_dir: str | Path) -> None:
    """Remove the folder Hydra made for a run refused before it claimed it (a mistyped setting, an impossible shape),
    so that a refused command leaves no run folder behind: only where it holds nothing but Hydra's config files and
    this process's log, and was not there before (a folder given on the command line that was is left as it was,
    `restore_run_config`). Its parents that were left empty go too, up to the working folder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _claimed or run_dir in _earlier_run_configs or not run_dir.is_dir():
        return
    try:
        _discard(run_dir)
    except FileNotFoundError:  # removed meanwhile by another rank of a torchrun job
        pass
    except OSError as e:
        log.warning(f"could not remove the folder made for this refused run, {run_dir}: {e}")


def _discard(run_dir: Path) -> None:
    """`discard_refused` once it knows the folder is not to be kept."""
    root = logging.getLogger()
    handlers = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    logs = {h: Path(h.baseFilename) for h in handlers if Path(h.baseFilename).parent.resolve() == run_dir}
    hydra_dir = run_dir / HYDRA_OUTPUT_DIR
    if any(p != hydra_dir and p not in logs.values() for p in run_dir.iterdir()):
        return
    if hydra_dir.exists() and (not hydra_dir.is_dir() or any(p.name not in HYDRA_FILES for p in hydra_dir.iterdir())):
        return
    for handler, path in logs.items():
        root.removeHandler(handler)
        handler.close()
        path.unlink(missing_ok=True)
    for name in HYDRA_FILES:
        (hydra_dir / name).unlink(missing_ok=True)
    if hydra_dir.exists():
        hydra_dir.rmdir()
    run_dir.rmdir()
    cwd = Path.cwd().resolve()
    for parent in run_dir.parents:
        if cwd not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def expand_home_in_run_dirs(args: list[str]) -> list[str]:
    """`args` with a `~` at the start of `hydra.run.dir` or `hydra.sweep.dir` expanded to the home folder, as the
    other path settings read it (Hydra would make a folder named `~`)."""
    expanded = []
    for arg in args:
        key = arg.split("=")[0]
        if key in ("hydra.run.dir", "hydra.sweep.dir") and isinstance(value := hydra_value(arg), str):
            if value.startswith("~") and (home := os.path.expanduser(value)) != value:  # an unknown ~user stays
                arg = hydra_override(key, home)
        expanded.append(arg)
    return expanded


def check_output_dir(args: list[str]) -> None:
    """Before Hydra sets up logging into it: refuse a run folder that cannot be written, in one line, and keep the
    Hydra config files of the run (or of the sweep's jobs) there, which a run refused at setup puts back."""
    given = given_output_dir(args)
    if given is None:
        return
    setting, value = given
    fixed = value.split("${")[0]  # up to an interpolation (`${now:...}`): a new folder under that part
    if fixed:
        check_writable(fixed, setting, folder=True)
    if fixed == value:
        given_dir = Path(value)
        # A sweep's job folders (its numbered subfolders, with the default hydra.sweep.subdir) that are there already
        jobs = (
            [p for p in given_dir.iterdir() if p.is_dir()]
            if setting == "hydra.sweep.dir" and given_dir.is_dir()
            else []
        )
        for folder in [given_dir] if setting == "hydra.run.dir" else sorted(jobs):
            check_hydra_paths(folder, f"{setting}={value}", job_log_name(args))
    if fixed == value and "hydra.output_subdir=null" not in args:  # torchrun's ranks > 0 save no config
        remember_run_configs(value, sweep=setting == "hydra.sweep.dir")


def job_log_name(args: list[str]) -> str:
    """The name of the log Hydra writes into a run folder: `hydra.job.name` (train, unless the command line gives
    another) and .log."""
    given = [hydra_value(arg) for arg in args if arg.startswith("hydra.job.name=")]
    return f"{given[-1] if given and isinstance(given[-1], str) else 'train'}.log"


def check_hydra_paths(run_dir: Path, given: str, log_name: str) -> None:
    """Refuse a run folder where Hydra would meet something else than the file or folder it writes (a folder named
    train.log, a file named .hydra): Hydra would end with a traceback, or wait forever on a named pipe. `given` is
    the setting as the command line gave it."""
    expected = {run_dir / log_name: "file", run_dir / HYDRA_OUTPUT_DIR: "folder"}
    expected |= {run_dir / HYDRA_OUTPUT_DIR / name: "file" for name in HYDRA_FILES}
    for path, kind in expected.items():
        if not os.path.lexists(path) or (path.is_symlink() and not path.exists()):  # Hydra makes a link's target
            continue
        found = "folder" if path.is_dir() else "file" if path.is_file() else "file of another kind (a pipe, a socket)"
        if found != kind:
            raise FluxtrainError(
                f"{given} holds a {found} at {path}, where Hydra writes a {kind}: remove it, or give the run another "
                "folder"
            )


class FolderInUse(FluxtrainError):
    """Another fluxtrain process is running in the run folder."""


def lock_run_dir(run_dir: str | Path) -> int | None:
    """Hold an exclusive lock on the run folder for as long as the returned descriptor is open (the kernel lets go of
    it when the process ends, however it ends): a second run in the folder at the same time, which would move or prune
    the first one's files as it writes them, is refused in one line. None where the file system has no locks."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUse(
            f"{run_dir} is in use by another fluxtrain run; wait for it to end, or give this run a folder of its own"
        ) from None
    except OSError:  # no locks here (some network file systems): run unguarded, as before
        os.close(fd)
        return None
    return fd
