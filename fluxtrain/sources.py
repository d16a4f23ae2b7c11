"""Corpus files to text: one file, a folder or a glob, skipping binaries, read as UTF-8 in bounded pieces.

`resolve_sources` picks the files, `iter_text` streams their text and `read_corpus` joins it into one string.
"""

from __future__ import annotations

import codecs
import errno
import glob
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch, fnmatchcase
from pathlib import Path

from fluxtrain.errors import FluxtrainError, expand_home
from fluxtrain.run_folder import HYDRA_OUTPUT_DIR

log = logging.getLogger(__name__)

READ_BLOCK = 1 << 22  # bytes read from a file at a time
BINARY_SNIFF = 8000  # a NUL byte in the first this many bytes marks a binary file (as git decides)


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
