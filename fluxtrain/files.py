"""Files on disk: written atomically (a crash or an error leaves the old file or the complete new one, never a part),
and JSON read from them without a crash on any content."""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fluxtrain.errors import FluxtrainError, expand_home, first_line


class WriteError(FluxtrainError, OSError):
    """A file that could not be written (a full disk, a read-only folder): one line naming the file and the OS
    error. Still an OSError, for callers that handle those."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"cannot write {path}: {error.strerror or first_line(error)}")
        self.path, self.strerror = path, error.strerror  # no errno: str() stays the message above


def user_path(path: str | Path, what: str, file: bool = True) -> Path:
    """A path a script passes: `~` made the home folder, as the commands do. An empty one, or for a `file` one that
    names no file (`Path("")` is `.`), is a FluxtrainError naming `what`."""
    if path == "":
        raise FluxtrainError(f"{what} '': the path is empty")
    resolved = expand_home(path, what)
    if file and resolved.name in ("", ".", ".."):
        raise FluxtrainError(f"{what} {str(path)!r} names a folder, not a file")
    return resolved


# atomic_write's temporary file for <name>: `.<name>.<hex digits>.tmp`, left behind by a process killed while writing
# (TEMP_FILE[1] is the name).
TEMP_FILE = re.compile(r"\.(.+)\.[0-9a-f]+\.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file in the same folder, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the complete new one, never a partial file at `path`. An
    OSError in writing it is a WriteError naming `path` (one about another file, which `write` reads, passes as it
    is).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            open(tmp, "xb").close()  # unlike mkstemp, honours the umask, so the file gets the usual permissions
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if isinstance(e, WriteError) or (e.filename is not None and Path(e.filename) not in (tmp, path, *path.parents)):
            raise
        raise WriteError(path, e) from e
    except Exception as e:  # tokenizers and safetensors write from Rust: an OS error there reads "... (os error 28)"
        if (code := rust_os_error(e)) is None:
            raise
        raise WriteError(path, OSError(code, os.strerror(code))) from e


def rust_os_error(e: Exception) -> int | None:
    """The errno of an OS error that a library written in Rust raised as a plain Exception, else None."""
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


PROBE_BYTES = 64 * 1024
NAME_MAX = 255  # the longest file or folder name in bytes on Linux and macOS file systems


def check_writable(path: str | Path, setting: str, folder: bool = False) -> None:
    """Raise a one-line error naming `setting` when `path` (a file, or a folder with `folder`) cannot be written:
    checked before any work, so a long job does not fail at its last step."""
    given = f"{setting}={path}" if "." in setting and not setting.startswith("-") else f"{setting} {path}"
    path = Path(path).expanduser()
    # A name longer than the file system takes: the OS says "no such file" before "too long" where a folder on the
    # way is missing, so Hydra would fail making it.
    too_long = next((part for part in path.parts if len(os.fsencode(part)) > NAME_MAX), None)
    if too_long is not None:
        raise FluxtrainError(f"{given} cannot be written: the name {too_long[:24]}... is longer than {NAME_MAX} bytes")
    if path.exists() and path.is_dir() != folder:
        kind = "a folder, not a file" if path.is_dir() else "a file, not a folder"
        raise FluxtrainError(f"{given} is {kind}")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FluxtrainError(f"{given} cannot be written: {parent} is a file, not a folder")
    try:
        # A real write, of as much as Hydra writes first (its config files): permissions, read-only mounts, /proc,
        # and a disk with no room left, where an empty file can still be made.
        with tempfile.TemporaryFile(dir=parent) as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        # The error is about the probe file, not `parent` (which exists): /proc, say, refuses it with ENOENT.
        raise FluxtrainError(
            f"{given} cannot be written: cannot create a file in {parent} ({e.strerror or e})"
        ) from None


def parse_json(text: str | bytes) -> Any:
    """`json.loads`, where JSON nested too deeply for Python's recursion limit (`[[[[...]]]]`) is a ValueError like
    any other malformed JSON, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
