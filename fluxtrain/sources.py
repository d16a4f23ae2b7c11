"""Corpus files to text: one file, a folder or a glob, skipping binaries, read as UTF-8 in bounded pieces.

`resolve_sources` picks the files, `iter_text` streams their text and `read_corpus` joins it into one string.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import glob
import hashlib
import logging
import os
import re
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch, fnmatchcase
from pathlib import Path

import requests
from tqdm import tqdm

from fluxtrain.errors import FluxtrainError, expand_home
from fluxtrain.run_folder import HYDRA_OUTPUT_DIR

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 22  # bytes read from a file at a time
BINARY_SNIFF = 8000  # a NUL byte in the first this many bytes marks a binary file (as git decides)
STALL_BYTES = 1 << 10  # a download that gets fewer bytes than this in `timeout` seconds is stopped


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(value: str | None, setting: str = "data.sha256") -> str | None:
    """`value` as 64 lower-case hex digits (case and surrounding spaces do not matter); None means no check."""
    if value is None:
        return None
    digest = str(value).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise FluxtrainError(f"{setting}={value!r} is not a sha256 (64 hex digits); give the file's sha256, or null")
    return digest


def _download_failure(e: requests.RequestException) -> str:
    """Why a download failed, in a few words: the HTTP status, or the network error."""
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason or ''}".strip()
    if isinstance(e, requests.Timeout) or "Read timed out" in str(e):  # a stall in the body: a ConnectionError
        return "timed out"
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return "the connection broke off"
    if m := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e)):  # e.g. Connection refused, Name or service not known
        return m[1].strip()
    text = str(e)
    return text if text and len(text) < 120 and "\n" not in text else type(e).__name__


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 30.0) -> Path:
    """Download `url` to `dest` unless a verified copy is there already.

    Bytes go to `dest.part` first and are renamed into place only once complete, not empty and verified, so an
    interrupted download never leaves a file that looks complete. A later call resumes the partial file with an HTTP
    Range request, but only if the server named the version of its file when the download began (a strong ETag, else
    Last-Modified, kept in `dest.part.validator`) and still has that version (If-Range); otherwise it starts over
    from byte 0. An empty file at `dest` (which no download leaves) is fetched again. Runs sharing the folder fetch
    one at a time (`dest.lock` is held meanwhile): a second run waits for the first, then finds its file.

    `timeout` (seconds) bounds the wait for the server to answer, and a download that gets fewer than `STALL_BYTES`
    in that long is stopped (a server trickling bytes would otherwise hold the run for ever); the bytes that did
    arrive are kept, for the next call to resume. A download logs one line as it starts.
    """
    dest = Path(dest)
    sha256 = check_sha256(sha256)
    if dest.is_file() and dest.stat().st_size and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        return _fetch(url, dest, sha256, timeout)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` for the block: other processes wait for it. The file exists only
    while locked; a waiter that gets the lock of a file already removed tries again with the new one."""
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        except BaseException:
            f.close()
            raise
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock is let go, so no one locks a file that is going away
        f.close()


def _validator(r: requests.Response) -> str | None:
    """What names the version of the file a response is about, for If-Range: a strong ETag, else Last-Modified (a
    weak ETag, `W/"..."`, may not be used for ranges)."""
    etag = r.headers.get("ETag", "").strip()
    if etag and not etag.startswith("W/"):
        return etag
    return r.headers.get("Last-Modified", "").strip() or None


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".validator")


def _discard(part: Path) -> None:
    """Remove a partial download and the validator saved with it."""
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


class _Stall:
    """Stops a download that makes too little progress: a server that trickles a byte now and then answers each read
    within requests' timeout, which bounds one read from the socket, not the time a chunk takes to fill. While
    `watching` a response, a thread checks that `received` (counted by the reader) grows by at least STALL_BYTES in
    each `window` seconds; if not, it shuts the connection down, so that the read waiting on it ends."""

    def __init__(self, window: float):
        self.window = window
        self.received = 0  # bytes of the body so far
        self.reading = False  # whether the body is being read: a timeout then is a stall too
        self.stopped = False  # whether the thread shut the connection down
        self.why = f"the download stalled: less than {STALL_BYTES // 1024} KiB arrived in the last {window:g} s"

    @contextlib.contextmanager
    def watching(self, r: requests.Response) -> Iterator[None]:
        done = threading.Event()

        def watch() -> None:
            seen = self.received
            while not done.wait(self.window):
                if self.received - seen < STALL_BYTES:
                    self.stopped = True
                    # The read waiting on the socket then sees the connection end. It fails if the response was
                    # read to its end and closed meanwhile, or with urllib3 < 2.3 (no shutdown): the reader then
                    # stops at its next chunk.
                    with contextlib.suppress(AttributeError, OSError, RuntimeError, ValueError):
                        r.raw.shutdown()
                    return
                seen = self.received

        thread = threading.Thread(target=watch, name="download-stall-watch", daemon=True)
        self.reading = True
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def _fetch(url: str, dest: Path, sha256: str | None, timeout: float) -> Path:
    """`download`'s body, run under its lock."""
    old: str | None = None  # the sha256 of a file already at dest, when one is expected
    wrong_copy = ""  # said if the download fails: a file at dest that is not the expected one
    if dest.is_file() and dest.stat().st_size == 0:
        dest.unlink()
    if dest.is_file():
        old = sha256_file(dest) if sha256 is not None else None
        if old == sha256:
            return dest
        wrong_copy = (
            f"; the file already at {dest} has sha256 {old}, not data.sha256={sha256} (the sha256 of the file "
            "data.url should hold, by default Tiny Shakespeare's: for another file give its sha256, or "
            "data.sha256=null)"
        )

    def failed(why: str) -> FluxtrainError:
        return FluxtrainError(
            f"could not download data.url={url} ({why}); download it by hand to {dest}, or set data.path{wrong_copy}"
        )

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    validator_file = _validator_path(part)  # latin-1: the header's bytes as the server sent them
    validator = validator_file.read_text(encoding="latin-1").strip() if offset and validator_file.is_file() else ""
    # A partial file whose version is not known (left by an older fluxtrain, or from a server that names none) may
    # be of another version of the file than the server's now: start from byte 0 rather than append to it.
    if not validator:
        _discard(part)
        offset = 0
    # If-Range: the bytes from `offset` on if the file is still the version the partial one holds, else all of it.
    headers = {"Range": f"bytes={offset}-", "If-Range": validator} if offset else {}
    headers["Accept-Encoding"] = "identity"  # a compressed body's ranges would count other bytes than the file's
    stall = _Stall(timeout)
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
            if offset and r.status_code in (206, 416) and _validator(r) not in (None, validator):
                _discard(part)  # a server that ignores If-Range, answering about another version: start over
                return _fetch(url, dest, sha256, timeout)
            if offset and r.status_code == 416:  # no bytes from `offset` on: complete, if as long as the partial file
                if r.headers.get("Content-Range", "").strip() != f"bytes */{offset}":  # else it changed meanwhile
                    _discard(part)
                    return _fetch(url, dest, sha256, timeout)  # from the start, without a Range
            else:
                r.raise_for_status()
                if r.headers.get("Content-Type", "").lower().startswith("text/html"):
                    raise failed("the server sent an HTML page, not a text file: check the URL")
                if offset and r.status_code != 206:  # the file changed (If-Range), or Range is not supported
                    offset = 0
                total = int(r.headers.get("Content-Length", 0)) + offset or None
                about = [f"{total:,} bytes"] if total else []
                about += [f"resuming at byte {offset:,}"] if offset else []
                log.info(f"downloading data.url={url} to {dest}" + (f" ({', '.join(about)})" if about else ""))
                with open(part, "ab" if offset else "wb") as f:
                    if not offset:  # which version of the file the bytes are, saved before them: what resumes it
                        if new := _validator(r):
                            validator_file.write_text(new + "\n", encoding="latin-1")
                        else:
                            validator_file.unlink(missing_ok=True)
                    with (
                        tqdm(
                            total=total,
                            initial=offset,
                            unit="B",
                            unit_scale=True,
                            desc=f"downloading {dest.name}",
                            disable=not sys.stderr.isatty(),  # a log file gets no lines of carriage returns
                        ) as bar,
                        stall.watching(r),
                    ):
                        # Chunks no larger than STALL_BYTES: `stall` sees the bytes of a slow server as they come.
                        for chunk in r.iter_content(chunk_size=STALL_BYTES):
                            f.write(chunk)
                            bar.update(len(chunk))
                            stall.received += len(chunk)
                            if stall.stopped:
                                break
                    if stall.stopped:  # a connection shut down may read as the end of a body of unknown length
                        raise requests.ConnectionError(stall.why)
                    f.flush()
                    os.fsync(f.fileno())
    except requests.RequestException as e:
        if part.is_file() and part.stat().st_size == 0:  # nothing to resume from
            _discard(part)
        why = _download_failure(e)
        if stall.stopped or (stall.reading and why == "timed out"):  # a silent server trips either, whichever first
            why = stall.why
        raise failed(why) from None
    if not part.is_file() or part.stat().st_size == 0:  # kept, it would pass for the corpus on every later run
        _discard(part)
        raise failed("the server sent an empty file")
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            _discard(part)
            kept = (
                f", and the file already at {dest} (sha256 {old}) does not match either: correct data.sha256, "
                "or put the right file there by hand"
                if wrong_copy
                else ""
            )
            raise FluxtrainError(
                f"checksum mismatch for data.url={url}: expected sha256 {sha256} (data.sha256), got {got}; "
                f"the download was discarded{kept} (data.sha256 names the file data.url should hold, by default Tiny "
                "Shakespeare: for another file give its sha256, or data.sha256=null)"
            )
    os.replace(part, dest)
    _validator_path(part).unlink(missing_ok=True)
    return dest


@dataclass
class Sources:
    """The text files of a corpus, in reading order, and what was left out."""

    files: list[Path]
    setting: str  # where they came from, for messages: "data.path=src/"
    sizes: list[int] = field(default_factory=list)
    n_binary: int = 0  # binary files skipped
    n_empty: int = 0  # empty files skipped
    n_broken: int = 0  # broken symbolic links skipped
    n_duplicates: int = 0  # further names (through links) of a file already read
    n_filtered: int = 0  # files left out by include/exclude
    n_loops: int = 0  # links to a folder they are inside, not followed
    left_out: dict[str, int] = field(default_factory=dict)  # why -> files left out ("data.cache_dir": 3)
    not_utf8: dict[Path, int] = field(default_factory=dict)  # files read with U+FFFD -> offset of the first bad byte

    @property
    def n_bytes(self) -> int:
        return sum(self.sizes)

    def notes(self) -> list[str]:
        """What was skipped or left out, one phrase per reason."""
        skipped = [f"{n} {what}" for n, what in ((self.n_binary, "binary"), (self.n_empty, "empty")) if n]
        notes = [f"{' and '.join(skipped)} file(s) skipped"] if skipped else []
        notes += [f"{self.n_broken} broken link(s) skipped"] if self.n_broken else []
        notes += [f"{self.n_duplicates} duplicate(s) of a file already read skipped"] if self.n_duplicates else []
        notes += [f"{self.n_loops} link loop(s) not followed"] if self.n_loops else []
        notes += [f"{self.n_filtered} file(s) left out by include/exclude"] if self.n_filtered else []
        notes += [f"{n} file(s) in {why} left out" for why, n in self.left_out.items()]
        return notes

    def describe(self) -> str:
        notes = self.notes()
        extra = f" ({'; '.join(notes)})" if notes else ""
        return f"{self.setting}: {len(self.files)} file(s), {self.n_bytes:,} bytes{extra}"

    def note_not_utf8(self, path: Path, offset: int) -> None:
        """Record that `path` is read with U+FFFD for its invalid bytes, with a warning the first time: a run may
        read a file several times (tokenizer, then encoding), or not at all (the token cache), and warns once."""
        if path not in self.not_utf8:
            self.not_utf8[path] = offset
            warn_not_utf8(path, offset)


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    """Whether the path `rel` or its file name matches one of the globs, where `**/` stands for any number of folders,
    none included, as in a recursive glob (fnmatch's `*` matches `/` already, but `**/` alone would need one)."""
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch(rel, v) or fnmatch(name, v) for p in patterns for v in _without_some_double_stars(p))


def _without_some_double_stars(pattern: str) -> set[str]:
    """`pattern` with each of its `**/` folders kept or dropped, every combination: `a/**/b/**/c` gives four
    patterns. Only a whole `**/` path segment is one (`x**/y` is not: it matches no file named `xy`)."""
    parts = re.split(r"(?:^|(?<=/))\*\*/", pattern)
    variants = {parts[0]}
    for part in parts[1:]:
        variants = {v + kept + part for v in variants for kept in ("**/", "")}
    return variants


def _is_empty(path: Path, size: int) -> bool:
    """No text: no bytes, or only the byte order mark (which is not read as text)."""
    if size != len(codecs.BOM_UTF8):
        return size == 0
    with open(path, "rb") as f:
        return f.read() == codecs.BOM_UTF8


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_SNIFF)


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_run_folder(folder: str) -> bool:
    """A folder fluxtrain (or another Hydra app) wrote a run into: it holds .hydra/ or multirun.yaml (Hydra's
    record of a run or sweep), or checkpoints/iter_*.ckpt."""
    return (
        os.path.isdir(os.path.join(folder, HYDRA_OUTPUT_DIR))
        or os.path.isfile(os.path.join(folder, "multirun.yaml"))
        or bool(glob.glob(os.path.join(glob.escape(folder), "checkpoints", "iter_*.ckpt")))
    )


class _Walk:
    """Expands a glob (or a whole folder, as `folder/**`) as `glob.glob(recursive=True)` does, but in sorted order,
    following links to folders except into a folder they are inside (a loop), and marking the files in folders to
    leave out: `leave_out` (real path -> why) and, with `run_folders`, fluxtrain's run folders. The folder the walk
    starts from is read even if it is one of these (it was named)."""

    def __init__(self, top: str, leave_out: dict[str, str], run_folders: bool):
        self.top = top
        real_top = os.path.realpath(top or ".")
        self.leave_out = {real: why for real, why in leave_out.items() if not _inside(real_top, real)}
        self.run_folders = run_folders
        self.n_hidden = 0  # hidden files and folders skipped by ** (a folder's own walk)
        self.n_loops = 0

    def paths(self, segments: list[str]) -> Iterator[tuple[str, str | None]]:
        """(path, why it is left out, or None) of everything `segments` (the glob after `top`) matches."""
        yield from self._expand(self.top, segments, (os.path.realpath(self.top or "."),), None)

    def area(self, real: str) -> str | None:
        """Why a file or folder (by real path) is left out, if it is."""
        return next((why for folder, why in self.leave_out.items() if _inside(real, folder)), None)

    def _enter(self, folder: str, segments: list[str], ancestors: tuple[str, ...], why: str | None):
        real = os.path.realpath(folder)
        if real in ancestors:  # a link back to a folder we are in: following it would never end
            self.n_loops += 1
            return
        why = (
            why or self.area(real) or ("fluxtrain run folders" if self.run_folders and is_run_folder(folder) else None)
        )
        yield from self._expand(folder, segments, (*ancestors, real), why)

    def _expand(self, folder: str, segments: list[str], ancestors: tuple[str, ...], why: str | None):
        seg, rest = segments[0], segments[1:]
        if seg == "**":  # this folder and every folder under it (not hidden ones)
            if rest:
                yield from self._expand(folder, rest, ancestors, why)
            for name in _listdir(folder):
                if name.startswith("."):
                    self.n_hidden += why is None  # a run folder's .hydra is not worth a mention
                    continue
                child = os.path.join(folder, name)
                if not rest:
                    yield child, why
                if os.path.isdir(child):
                    yield from self._enter(child, segments, ancestors, why)
        elif glob.has_magic(seg):
            for name in _listdir(folder):
                if (seg.startswith(".") or not name.startswith(".")) and fnmatchcase(name, seg):
                    child = os.path.join(folder, name)
                    if not rest:
                        yield child, why
                    elif os.path.isdir(child):
                        yield from self._enter(child, rest, ancestors, why)
        else:
            child = os.path.join(folder, seg)
            if not rest:
                if os.path.lexists(child):
                    yield child, why
            elif os.path.isdir(child):
                yield from self._enter(child, rest, ancestors, why)


def _listdir(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder or "."))
    except OSError:  # unreadable, or gone: as glob and os.walk do, nothing is found there
        return []


def resolve_sources(
    path: str,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    setting: str = "data.path",
    leave_out: dict[Path, str] | None = None,
    run_folders: bool = False,
) -> Sources:
    """The files `path` names: one file, every text file under a folder (recursively), or the matches of a glob.

    Files under a folder or glob are kept if they match one of `include` (when given) and none of `exclude`
    (globs matched against the file name and against the path relative to the folder, or for a glob the path as
    it matched), then sorted by path;
    hidden files and folders are skipped, and so are binary files (a NUL byte near the start), empty files, broken
    symbolic links (with a warning naming them) and what is not a regular file (FIFOs, sockets, devices).
    Links to files and folders are followed, except a link into a folder it is in (a loop), and a file reached
    under several names is read once, under the first name in sorted order. Files inside the folders of
    `leave_out` (folder -> why, e.g. the cache) and, with `run_folders`, inside fluxtrain run folders are left out
    too, unless `path` itself lies in them.
    """
    # One glob given as a text, not a list of them: a list of its characters would match nearly anything.
    include, exclude = ([globs] if isinstance(globs, str) else list(globs) for globs in (include, exclude))
    where = f"{setting}={path}"
    target = expand_home(path, setting)
    leave_out = {os.path.realpath(Path(folder).expanduser()): why for folder, why in (leave_out or {}).items()}
    if target.is_file():
        if _is_empty(target, target.stat().st_size):
            raise FluxtrainError(f"{setting}: file {target} is empty")
        if _is_binary(target):  # what a folder would skip is an error when named
            with open(target, "rb") as f:
                if f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
                    raise FluxtrainError(f"{setting}: {target} is UTF-16 text; convert it to UTF-8 (e.g. with iconv)")
            raise FluxtrainError(f"{setting}: {target} is a binary file (a NUL byte in its first {BINARY_SNIFF} bytes)")
        return Sources([target], where, [target.stat().st_size])
    if target.is_dir():
        walk = _Walk(str(target), leave_out, run_folders)
        found = walk.paths(["**"])
        candidates = [
            (Path(p).relative_to(target).as_posix(), Path(p), why) for p, why in found if not os.path.isdir(p)
        ]
    elif target.exists():
        raise FluxtrainError(f"{setting}: {target} is not a regular file or a folder")
    elif glob.has_magic(path):
        pattern = os.path.expanduser(path).split("/")
        n_fixed = next(i for i, seg in enumerate(pattern) if glob.has_magic(seg))
        top = "/".join(pattern[:n_fixed]) or ("/" if pattern[0] == "" and n_fixed else "")
        walk = _Walk(top, leave_out, run_folders)
        found = dict.fromkeys(walk.paths(pattern[n_fixed:]))  # a pattern such as **/** finds a path twice
        candidates = [(Path(p).as_posix(), Path(p), why) for p, why in found if not os.path.isdir(p)]
        if not candidates:
            raise FluxtrainError(f"{where}: the glob matches no files")
    elif _is_broken_link(target):
        try:
            os.stat(target)
        except OSError as e:
            if e.errno == errno.ELOOP:  # links that lead back to each other, not to a missing file
                raise FluxtrainError(f"{setting}: {target} is a link in a loop of links") from None
        raise FluxtrainError(f"{setting}: {target} is a broken link to {os.readlink(target)}")
    elif path.endswith("/"):
        raise FluxtrainError(f"{setting}: folder {target} does not exist")
    else:
        raise FluxtrainError(f"{setting}: file {target} does not exist")
    sources, broken, n_special = Sources([], where, n_loops=walk.n_loops), [], 0
    read: set[str] = set()  # real paths of the files kept
    for rel, file, why in sorted(candidates, key=lambda c: c[0]):
        real = os.path.realpath(file)
        why = why or walk.area(real)  # a link to a file in a folder left out
        if why:
            sources.left_out[why] = sources.left_out.get(why, 0) + 1
        elif (include and not _matches(rel, include)) or _matches(rel, exclude):
            sources.n_filtered += 1
        elif _is_broken_link(file):
            broken.append(f"{file} -> {os.readlink(file)}")
        elif not stat.S_ISREG((st := file.stat()).st_mode):
            n_special += 1  # a FIFO, socket or device: reading it could block or never end
        elif _is_empty(file, st.st_size):
            sources.n_empty += 1
        elif real in read:
            sources.n_duplicates += 1
        elif _is_binary(file):
            sources.n_binary += 1
        else:
            read.add(real)
            sources.files.append(file)
            sources.sizes.append(st.st_size)
    sources.n_broken = len(broken)
    if broken:
        more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
        log.warning(f"{where}: skipping {len(broken)} broken link(s): {', '.join(broken[:5])}{more}")
    if not sources.files:
        filters = " and ".join(
            f"{name}={globs}" for name, globs in (("include", include), ("exclude", exclude)) if globs
        )
        filters = f" with {filters}" if filters else ""
        found = [
            f"{n} {what}"
            for n, what in (
                (walk.n_hidden, "hidden file(s) or folder(s)"),
                (sources.n_filtered, "file(s) left out by include/exclude"),
                (sources.n_binary, "binary file(s)"),
                (sources.n_empty, "empty file(s)"),
                (sources.n_broken, "broken link(s)"),
                (n_special, "FIFO(s), socket(s) or device(s)"),
                *((n, f"file(s) in {why}") for why, n in sources.left_out.items()),
            )
            if n
        ]
        found_text = f"only {', '.join(found)}, which are skipped" if found else "the folder is empty"
        raise FluxtrainError(f"{where}: no text files found{filters} ({found_text})")
    return sources


def warn_not_utf8(path: Path, offset: int) -> None:
    log.warning(f"{path} is not valid UTF-8 (first bad byte at offset {offset}); read with U+FFFD for them")


def iter_file_text(
    path: Path,
    encoding_errors: str = "strict",
    setting: str = "data.path",
    on_invalid: Callable[[Path, int], None] = warn_not_utf8,
) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of at most a few MiB, without the byte order mark some editors put at its
    start; invalid bytes are an error naming the byte offset,
    or with `encoding_errors="replace"` become U+FFFD, and `on_invalid(path, offset of the first bad byte)` is called
    (by default, a warning)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK)
            final = not block
            if offset == 0 and block.startswith(codecs.BOM_UTF8):  # a signature some editors write, not text
                block, offset = block[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            pending = decoder.getstate()[0]  # bytes of a character split across blocks
            try:
                text = decoder.decode(block, final=final)
            except UnicodeDecodeError as e:
                bad = offset - len(pending) + e.start
                if encoding_errors != "replace":
                    # A command-line option (--data) has its own --encoding-errors; a config setting, data's.
                    option = (
                        "pass --encoding-errors=replace"
                        if setting.startswith("--")
                        else "set data.encoding_errors=replace"
                    )
                    raise FluxtrainError(
                        f"{setting}: {path} is not valid UTF-8 (byte offset {bad}); "
                        f"{option} to read it with replacement characters"
                    ) from None
                on_invalid(path, bad)
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                text = decoder.decode(pending + block, final=final)
            offset += len(block)
            if text:
                yield text
            if final:
                return


def iter_text(sources: Sources, separator: str = "\n", encoding_errors: str = "strict") -> Iterator[str]:
    """The corpus as a stream of text pieces: each file in order, with `separator` between files. A file that is not
    valid UTF-8 is warned about once per `sources`, however often it is read."""
    setting = sources.setting.split("=", 1)[0]
    for i, path in enumerate(sources.files):
        if i and separator:
            yield separator
        yield from iter_file_text(path, encoding_errors, setting, sources.note_not_utf8)


def read_corpus(sources: Sources, separator: str = "\n", encoding_errors: str = "strict") -> str:
    """The whole corpus as one string (for corpora that fit in memory; training streams instead)."""
    return "".join(iter_text(sources, separator, encoding_errors))


def text_bytes(sources: Sources, separator: str = "\n", encoding_errors: str = "strict") -> int:
    """How many bytes (UTF-8) the text `iter_text` gives has: valid UTF-8 reads back as the same bytes, less a
    byte order mark at the start of a file, so only files read with replacement characters are read to count."""
    if encoding_errors == "replace":
        return sum(len(piece.encode("utf-8")) for piece in iter_text(sources, separator, encoding_errors))
    boms = 0
    for path in sources.files:
        with open(path, "rb") as f:
            boms += f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8
    n_separators = max(len(sources.files) - 1, 0) if separator else 0
    return sources.n_bytes - boms * len(codecs.BOM_UTF8) + n_separators * len(separator.encode("utf-8"))


def _char_start(raw: bytes, i: int) -> int:
    """The start of the character that byte `i` of the UTF-8 `raw` belongs to."""
    while 0 < i < len(raw) and raw[i] & 0xC0 == 0x80:  # a continuation byte
        i -= 1
    return i


def head_text(pieces: Iterable[str], n_bytes: int) -> Iterator[str]:
    """The text before byte `n_bytes` (UTF-8) of a stream of pieces, cut at the start of the character that byte is
    in; `tail_text` gives the rest."""
    for piece in pieces:
        if n_bytes <= 0:
            return
        raw = piece.encode("utf-8")
        if len(raw) > n_bytes:
            yield raw[: _char_start(raw, n_bytes)].decode("utf-8")
            return
        n_bytes -= len(raw)
        yield piece


def tail_text(pieces: Iterable[str], n_bytes: int) -> Iterator[str]:
    """The text from byte `n_bytes` (UTF-8) of a stream of pieces on: what `head_text` leaves."""
    for piece in pieces:
        if n_bytes <= 0:
            yield piece
            continue
        raw = piece.encode("utf-8")
        if len(raw) > n_bytes:
            yield raw[_char_start(raw, n_bytes) :].decode("utf-8")
        n_bytes -= len(raw)
