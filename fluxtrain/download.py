"""Fetching `data.url`: into a partial file renamed into place once complete and checked against `data.sha256`,
resumed where the server names the version of its file, stopped when the server stalls, one run at a time per file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import requests
from tqdm import tqdm

from fluxtrain.errors import FluxtrainError

log = logging.getLogger(__name__)

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
