"""Text to token batches: the data config, encoding the corpus once into a memmap cache, the splits and batches.

Finding and reading the files is `fluxtrain.sources`, fetching `data.url` `fluxtrain.download`; `load_corpus` is what
training calls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import numbers
import re
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from fluxtrain.cuts import BYTE_LEVEL_CUTS, CutRule
from fluxtrain.download import check_sha256, download, sha256_file
from fluxtrain.errors import FluxtrainError, describe_failure
from fluxtrain.files import TEMP_FILE, WriteError, atomic_write, atomic_write_text, check_writable, parse_json
from fluxtrain.sources import (
    Sources,
    head_text,
    iter_text,
    read_corpus,
    resolve_sources,
    tail_text,
    text_bytes,
)
from fluxtrain.tokenizer import (
    EncodeError,
    Tokenizer,
    TokenizerConfig,
    UnknownCharactersError,
    build_tokenizer,
    load_configured,
    load_tokenizer,
    warn_unused,
)
from fluxtrain.tokenizer import validate as validate_tokenizer

__all__ = ["DataConfig", "TokenData", "load_corpus", "read_corpus", "resolve_sources", "corpus_sources", "iter_text"]

log = logging.getLogger(__name__)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"  # the name SHAKESPEARE_URL is saved under in data.cache_dir
ENCODING_ERRORS = ("strict", "replace")
# 2: a byte order mark at the start of a file is not text; 3: a tokenizer that drops characters is refused;
# 4: the validation split is the last val_fraction of the text's bytes, and a trained BPE sees none of it
CACHE_VERSION = 4
ENCODE_CHUNK = 1 << 18  # characters per encoded piece; a batch of these is encoded in parallel
ENCODE_BATCH = 8
CACHE_FOLDERS = ("tokens", "tokenizers")  # in data.cache_dir: encoded ids, trained tokenizers
BUILT_FROM_TEXT = "the files as first read; did one change since?"  # where a tokenizer built from the text came from
VERIFY_BLOCK = 1 << 24  # bytes of cached ids hashed at a time
TRAIN_PIECE = 1 << 16  # characters per piece of text handed to the BPE trainer
# A longer piece has no place to cut it exactly (a line of DNA, of digits, or CJK without spaces): the trainer gets
# it in pieces of this many characters, since its time grows with the square of a word's length; a cut word there
# changes the pair counts by one pair in thousands.
TRAIN_WORD = 1 << 12


@dataclass
class DataConfig:
    path: str | None = None  # a file, a folder or a glob ('src/**/*.py'); null: download Tiny Shakespeare from `url`
    include: list[str] = field(default_factory=list)  # for folders and globs: keep only files matching one of these
    exclude: list[str] = field(default_factory=list)  # for folders and globs: drop files matching one of these
    separator: str = "\n"  # put between consecutive files; \n, \t, \r and \\ in it are read as escapes
    encoding_errors: str = "strict"  # strict: invalid UTF-8 is an error | replace: U+FFFD and a warning
    val_path: str | None = None  # a separate validation text (file, folder or glob) instead of val_fraction
    url: str = SHAKESPEARE_URL
    sha256: str | None = SHAKESPEARE_SHA256
    val_fraction: float = 0.1  # the last fraction of the text (UTF-8 bytes), when val_path is not set
    cache_dir: str = "~/.cache/fluxtrain"  # downloads, trained tokenizers and encoded token ids
    cache: bool = True  # keep the encoded token ids (and trained tokenizer) in cache_dir for the next run


def validate(cfg: DataConfig) -> None:
    # Only null means "not set": an empty value is most likely an unset shell variable.
    for name, null in (("path", "download data.url"), ("val_path", "split off data.val_fraction")):
        value = getattr(cfg, name)
        if value is not None and not str(value).strip():
            raise FluxtrainError(f"data.{name}={value!r} is empty; give a file, folder or glob, or null to {null}")
    if not str(cfg.cache_dir).strip():
        raise FluxtrainError(f"data.cache_dir={cfg.cache_dir!r} is empty; give a folder (default ~/.cache/fluxtrain)")
    if not cfg.path and not str(cfg.url).strip():
        raise FluxtrainError(f"data.url={cfg.url!r} is empty; give the URL of a text file, or a data.path")
    try:
        urllib.parse.urlsplit(str(cfg.url))  # the download's file name comes from it
    except ValueError as e:
        raise FluxtrainError(f"data.url={cfg.url!r} is not a valid URL ({e})") from None
    check_sha256(cfg.sha256)
    if cfg.encoding_errors not in ENCODING_ERRORS:
        raise FluxtrainError(f"data.encoding_errors={cfg.encoding_errors!r} is not one of {', '.join(ENCODING_ERRORS)}")
    if not cfg.val_path and not 0.0 < cfg.val_fraction < 1.0:
        raise FluxtrainError(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1 (or set data.val_path)")
    if cfg.val_path and not 0.0 <= cfg.val_fraction < 1.0:  # unused, but a sweep may switch data.val_path off
        raise FluxtrainError(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1")


SEPARATOR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def separator_text(value: str) -> str:
    """`data.separator` with `\\n`, `\\t`, `\\r` and `\\\\` read as a newline, a tab, a carriage return and a backslash:
    Hydra's command line has no other way to write a newline (`data.separator='\\n\\n'`)."""
    return re.sub(r"\\([ntr\\])", lambda m: SEPARATOR_ESCAPES[m[1]], value)


def check_cache_dir(cfg: DataConfig) -> None:
    """`data.cache_dir` must be a folder this process can write to, when the cache or the download needs it."""
    if cfg.path and not cfg.cache:
        return
    fix = "set data.cache_dir to a writable folder" + (" or data.cache=false" if cfg.path else "")
    try:
        check_writable(cfg.cache_dir, "data.cache_dir", folder=True)
    except FluxtrainError as e:
        raise FluxtrainError(f"{e}; {fix}") from None
    for name in CACHE_FOLDERS if cfg.cache else ():
        folder = Path(cfg.cache_dir).expanduser() / name
        if folder.exists() and not folder.is_dir():
            raise FluxtrainError(f"data.cache_dir={cfg.cache_dir} holds a file {folder} where a folder goes; {fix}")


def download_path(cfg: DataConfig) -> Path:
    """Where `data.url` is saved in `data.cache_dir`: the default corpus as tinyshakespeare.txt, any other URL as
    its file name with a hash of the URL added (other-1a2b3c4d5e6f.txt), so two URLs never share a file or a
    partial download."""
    folder = Path(cfg.cache_dir).expanduser()
    if cfg.url == SHAKESPEARE_URL:
        return folder / SHAKESPEARE_FILE
    name = Path(re.sub(r"[^A-Za-z0-9._-]", "_", urllib.parse.urlsplit(cfg.url).path.rsplit("/", 1)[-1]))
    stem, suffix = (name.stem.lstrip(".") or "download")[:64], name.suffix[:16]
    return folder / f"{stem}-{hashlib.sha256(cfg.url.encode('utf-8')).hexdigest()[:12]}{suffix}"


def resolve_text_path(cfg: DataConfig) -> Path:
    """`data.path` as given (a file, folder or glob), or `data.url` downloaded into `data.cache_dir`."""
    if cfg.path:
        return Path(cfg.path).expanduser()
    dest = download_path(cfg)
    try:
        return download(cfg.url, dest, check_sha256(cfg.sha256))
    except OSError as e:  # a full disk: what arrived is kept in <file>.part, for the next run to resume
        raise FluxtrainError(
            f"data.cache_dir={cfg.cache_dir}: cannot write the download of data.url into {dest.parent}: "
            f"{e.strerror or e}; give data.cache_dir a folder with room, or download the file by hand and set data.path"
        ) from None


def corpus_sources(cfg: DataConfig, run_dir: str | Path | None = None) -> tuple[Sources, Sources | None]:
    """The training files (`data.path`, or the downloaded default corpus) and `data.val_path`'s, if set.

    A folder or glob never reads fluxtrain's own output: `run_dir` (the folder this run writes), other run
    folders and `data.cache_dir` are left out.
    """
    leave_out = {Path(cfg.cache_dir): "data.cache_dir"}
    if run_dir is not None:
        leave_out[Path(run_dir)] = "this run's folder"

    def sources(path: str, setting: str) -> Sources:
        return resolve_sources(path, cfg.include, cfg.exclude, setting, leave_out, run_folders=True)

    if cfg.path:
        train = sources(cfg.path, "data.path")
    else:
        downloaded = resolve_text_path(cfg)
        train = resolve_sources(str(downloaded), setting="data.url")
        train.setting = f"data.url={cfg.url} (cached as {downloaded})"  # the address given, and the file read
    val = sources(cfg.val_path, "data.val_path") if cfg.val_path else None
    if (cfg.include or cfg.exclude) and all(Path(p).expanduser().is_file() for p in (cfg.path, cfg.val_path) if p):
        log.warning(
            "data.include and data.exclude choose files in a folder or glob: with one file to read, they are ignored"
        )
    if val is not None:
        val.not_utf8 = train.not_utf8  # a file in both is warned about once
        shared = {f.resolve() for f in train.files} & {f.resolve() for f in val.files}
        if shared:
            log.warning(
                f"data.val_path and data.path share {len(shared)} file(s) (e.g. {min(shared)}): the validation loss "
                "is then measured on text the model trains on"
            )
    return train, val


def safe_chunks(pieces: Iterable[str], target: int = ENCODE_CHUNK, cuts: CutRule = BYTE_LEVEL_CUTS) -> Iterator[str]:
    """Re-cut a stream of text pieces into chunks of about `target` characters whose ids, concatenated, are exactly
    the ids of the whole text: cut only where `cuts` (the tokenizer's `cut_rule()`; by default, fluxtrain's
    byte-level BPE) says the ids stay the same. A chunk is longer only where the text offers no such place within
    it: never for the char tokenizer; for byte-level BPE, a run of letters (or digits) with nothing else between
    them, which the tokenizer itself keeps in one piece."""
    buf = ""
    searched = 0  # where to go on looking for a cut past the target, in the current `buf`
    for piece in pieces:
        buf += piece
        start = 0
        while len(buf) - start >= target:
            cut = cuts.last(buf, start + 1, start + target)
            if cut is None:
                cut = cuts.first(buf, max(start + target + 1, searched))
            if cut is None:
                searched = max(cuts.limit(buf) + 1, 0)
                break
            yield buf[start:cut]
            start = cut
        buf = buf[start:]
        searched = max(searched - start, 0)
    if buf:
        yield buf


# ----------------------------------------------------------------------------------------------------------------------
# Encoding, with a cache


def id_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode_stream(
    pieces: Iterable[str], tokenizer: Tokenizer, setting: str = "data.path", tokenizer_source: str = "tokenizer.path"
) -> Iterator[np.ndarray]:
    """Token ids of a stream of text, in arrays of a few hundred thousand, with bounded memory; text the tokenizer
    cannot encode is an error naming `setting` and where the tokenizer came from."""
    chunks = safe_chunks(pieces, cuts=tokenizer.cut_rule())
    while batch := list(itertools.islice(chunks, ENCODE_BATCH)):
        try:
            arrays = tokenizer.encode_batch(batch)
        except EncodeError as e:
            if isinstance(e, UnknownCharactersError):  # named for the rest of the text too, in one error
                e = every_unknown_char(tokenizer, e, itertools.chain(batch, chunks))
            raise FluxtrainError(f"{setting}: {e} (the tokenizer comes from {tokenizer_source})") from None
        yield from arrays


def trainer_pieces(text: Iterable[str]) -> Iterator[str]:
    """`text` in pieces for the BPE trainer: `safe_chunks` of TRAIN_PIECE characters, one that has no place to cut
    it (and so is longer) cut every TRAIN_WORD characters."""
    for chunk in safe_chunks(text, TRAIN_PIECE):
        if len(chunk) <= TRAIN_PIECE:
            yield chunk
        else:
            yield from (chunk[i : i + TRAIN_WORD] for i in range(0, len(chunk), TRAIN_WORD))


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """`tokenizer.encode(text)`; a long text in pieces that encode apart to the same ids, a batch of them at a time,
    so that memory follows a batch rather than the text (a whole book piped in as a prompt)."""
    if len(text) <= ENCODE_CHUNK:
        return tokenizer.encode(text)
    chunks = safe_chunks([text], ENCODE_CHUNK, tokenizer.cut_rule())
    ids: list[int] = []
    while batch := list(itertools.islice(chunks, ENCODE_BATCH)):
        for array in tokenizer.encode_batch(batch):
            ids += array.tolist()
    return ids


def every_unknown_char(
    tokenizer: Tokenizer, error: UnknownCharactersError, rest: Iterable[str]
) -> UnknownCharactersError:
    """`error`, naming also each character of the texts `rest` that the tokenizer lacks: a user fixing the text
    learns of them all at once."""
    unknown = set(error.chars)
    for text in rest:
        unknown.update(tokenizer.unknown_chars(text))
    return UnknownCharactersError(sorted(unknown))


def encode_all(pieces: Iterable[str], tokenizer: Tokenizer, setting: str, tokenizer_source: str) -> np.ndarray:
    """`encode_stream`'s ids in one array (uint16 when the vocabulary fits, else uint32)."""
    dtype = id_dtype(tokenizer.vocab_size)
    arrays = [a.astype(dtype) for a in encode_stream(pieces, tokenizer, setting, tokenizer_source)]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


def sources_fingerprint(sources: Sources) -> list[list]:
    """What identifies the input: each file's path, size and content hash."""
    return [[str(p.resolve()), size, sha256_file(p)] for p, size in zip(sources.files, sources.sizes, strict=True)]


def _key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:32]


class ByteCount:
    """Counts the bytes (UTF-8) of the text pieces passed `through` it."""

    def __init__(self) -> None:
        self.n = 0

    def through(self, pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            self.n += len(piece.encode("utf-8"))
            yield piece


SPLITS = {"train": head_text, "val": tail_text}  # a split of one text: the part before a byte, or from it on


def encode_sources(
    sources: Sources,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    fingerprint: list | None = None,
    tokenizer_source: str = "tokenizer.path",
    split: tuple[str, int] | None = None,
) -> tuple[np.ndarray, int]:
    """Token ids of `sources`, and the bytes of text they stand for (as read, before any normalizer), from the memmap
    cache when the same files were encoded with the same tokenizer. `split` ("train" or "val", a byte) encodes only
    the text before that byte, or from it on.

    The ids are written to disk as they are encoded (uint16 when the vocabulary fits, else uint32) and read back as
    a read-only `numpy.memmap`, so memory stays bounded whatever the corpus size. An entry is kept only if the files
    still have the content it is keyed by once they are read: a file that changes meanwhile is an error.
    """
    dtype = id_dtype(tokenizer.vocab_size)
    setting = sources.setting.split("=", 1)[0]
    counted = ByteCount()
    pieces = iter_text(sources, cfg.separator, cfg.encoding_errors)
    pieces = counted.through(SPLITS[split[0]](pieces, split[1]) if split else pieces)
    if not cfg.cache:
        return encode_all(pieces, tokenizer, setting, tokenizer_source), counted.n
    fingerprint = fingerprint or sources_fingerprint(sources)
    key = _key(
        {
            "version": CACHE_VERSION,
            "sources": fingerprint,
            "separator": cfg.separator,
            "encoding_errors": cfg.encoding_errors,
            "tokenizer": tokenizer.to_json(),
            "split": split,
        }
    )
    folder = Path(cfg.cache_dir).expanduser() / "tokens"
    ids_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    if meta_path.is_file() and ids_path.is_file():
        try:
            n_tokens, n_bytes, not_utf8 = _check_entry(
                ids_path, meta_path, dtype, tokenizer.vocab_size, cfg.encoding_errors, len(sources.files)
            )
        except (OSError, ValueError) as e:
            log.warning(f"{sources.setting}: discarding the token cache entry {ids_path} ({e}); encoding again")
        else:
            for i, offset in not_utf8:  # the files are not read, but the warning is still due
                sources.note_not_utf8(sources.files[i], offset)
            log.info(f"{sources.setting}: {n_tokens:,} token ids from the cache {ids_path}")
            return _open_ids(ids_path, dtype, n_tokens), n_bytes
    n_tokens, digest = 0, hashlib.blake2b()

    def write_ids(tmp: Path) -> None:
        nonlocal n_tokens
        with open(tmp, "wb") as f:
            for ids in encode_stream(pieces, tokenizer, setting, tokenizer_source):
                raw = ids.astype(dtype).tobytes()
                f.write(raw)
                digest.update(raw)
                n_tokens += len(ids)
        check_unchanged(sources, fingerprint)
        digest.update(byte_count_record(counted.n))  # val/bpb divides by it: vouched for with the ids

    # Each file is written whole or not at all, the ids before the entry that vouches for them with their digest: a
    # crash in between leaves ids that no entry vouches for, which are encoded again.
    remove_dead_writes(folder)
    with writing_cache(cfg.cache_dir):
        atomic_write(ids_path, write_ids)
    meta = {
        "n_tokens": n_tokens,
        "n_bytes": counted.n,
        "dtype": np.dtype(dtype).name,
        "blake2b": digest.hexdigest(),
        "source": sources.setting,
        "split": split,  # the part of the text: ["train", byte] before that byte, ["val", byte] from it on; or null
        # (index in the files, offset of the first bad byte) of each file read with U+FFFD, to warn on a cache hit
        "not_utf8": [[i, sources.not_utf8[p]] for i, p in enumerate(sources.files) if p in sources.not_utf8],
    }
    with writing_cache(cfg.cache_dir):
        atomic_write_text(meta_path, json.dumps(meta))
    log.info(f"{sources.setting}: encoded {n_tokens:,} tokens into {ids_path}")
    return _open_ids(ids_path, dtype, n_tokens), counted.n


DEAD_WRITE_SECONDS = 3600  # a cache file's temporary untouched this long is a killed process's: a live write goes on


def remove_dead_writes(folder: Path) -> None:
    """Remove the temporary files that processes killed while writing a cache entry left in `folder`. The cache is
    shared: only those untouched for DEAD_WRITE_SECONDS, not another run's write in progress."""
    cutoff = time.time() - DEAD_WRITE_SECONDS
    for path in folder.glob(".*.tmp") if folder.is_dir() else ():
        try:
            if TEMP_FILE.fullmatch(path.name) and path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: the entry is written all the same
            pass


@contextmanager
def writing_cache(cache_dir: str) -> Iterator[None]:
    """A cache file that cannot be written (a full disk) is one line naming data.cache_dir and the ways out."""
    try:
        yield
    except WriteError as e:
        raise FluxtrainError(
            f"data.cache_dir={cache_dir}: {e}; give data.cache_dir a folder with room, or set data.cache=false"
        ) from None


def check_unchanged(sources: Sources, fingerprint: list) -> None:
    """Refuse to keep ids of files that changed since `fingerprint` was taken: the entry would be keyed by content
    other than the one encoded, and a later run on that content would read these ids."""
    for path, (_, _, digest) in zip(sources.files, fingerprint, strict=True):
        try:
            same = sha256_file(path) == digest
        except OSError:  # removed, say
            same = False
        if not same:
            raise FluxtrainError(
                f"{sources.setting}: {path} changed while it was read; run again once it stays the same"
            )


def _check_entry(
    ids_path: Path, meta_path: Path, dtype, vocab_size: int, encoding_errors: str, n_files: int
) -> tuple[int, int, list[tuple[int, int]]]:
    """The number of ids in a cache entry, the bytes of text they stand for and its files read with U+FFFD ((index,
    offset of the first bad byte)), after checking the ids against its size and digest and the vocabulary;
    ValueError (or OSError) says what is wrong."""
    try:
        meta = parse_json(meta_path.read_text(encoding="utf-8"))
        n_tokens, expected = int(meta["n_tokens"]), meta.get("blake2b")
        n_bytes = int(meta["n_bytes"]) if "n_bytes" in meta else None
        if n_bytes is not None and n_bytes < 0:
            raise ValueError(f"n_bytes={n_bytes} is negative")
        not_utf8 = meta.get("not_utf8")
        if not_utf8 is not None:
            not_utf8 = [(int(i), int(offset)) for i, offset in not_utf8]
            if any(not 0 <= i < n_files for i, _ in not_utf8):
                raise ValueError(f"not_utf8 names a file outside the {n_files} read")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path.name} is not a valid entry: {describe_failure(e)}") from None
    if expected is None:
        raise ValueError(f"{meta_path.name} has no digest of the ids (an older fluxtrain wrote it)")
    if n_bytes is None:
        raise ValueError(
            f"{meta_path.name} does not say how many bytes of text the ids stand for (an older fluxtrain wrote it)"
        )
    if not_utf8 is None and encoding_errors == "replace":
        raise ValueError(f"{meta_path.name} does not say which files are not valid UTF-8 (an older fluxtrain wrote it)")
    if ids_path.stat().st_size != n_tokens * np.dtype(dtype).itemsize:
        raise ValueError(f"{ids_path.name} does not hold {n_tokens:,} ids")
    digest, max_id = hashlib.blake2b(), 0
    with open(ids_path, "rb") as f:
        for block in iter(lambda: f.read(VERIFY_BLOCK), b""):
            digest.update(block)
            max_id = max(max_id, int(np.frombuffer(block, dtype).max()))
    digest.update(byte_count_record(n_bytes))
    if digest.hexdigest() != expected:
        raise ValueError(f"{ids_path.name} and its byte count do not match the blake2b digest in {meta_path.name}")
    if max_id >= vocab_size:
        raise ValueError(f"{ids_path.name} holds id {max_id}, outside the vocabulary of {vocab_size}")
    return n_tokens, n_bytes, not_utf8 or []


def byte_count_record(n_bytes: int) -> bytes:
    """What a cache entry's digest covers besides its ids: the bytes of text they stand for."""
    return f"n_bytes={n_bytes}".encode()


def _open_ids(path: Path, dtype, n_tokens: int) -> np.ndarray:
    """The cached ids as a read-only memmap (an empty file cannot be mapped; TokenData reports it as too short)."""
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)


def check_round_trip(tokenizer: Tokenizer, train: Sources, cfg: DataConfig, source: str) -> None:
    """A tokenizer the run was given (by `source`) must encode the start of the text, and is warned about when it
    does not decode it back as it was (it normalizes it); checked also on a cache hit, when nothing is encoded."""
    sample = next(iter_text(train, cfg.separator, cfg.encoding_errors))[:10_000]
    try:
        exact = tokenizer.decode(tokenizer.encode(sample)) == sample
    except EncodeError as e:
        if isinstance(e, UnknownCharactersError):  # named for the whole text, not its start
            e = every_unknown_char(tokenizer, e, iter_text(train, cfg.separator, cfg.encoding_errors))
        setting = train.setting.split("=", 1)[0]  # as encoding names it
        raise FluxtrainError(f"{setting}: {e} (the tokenizer comes from {source.split('=')[0]})") from None
    if not exact:
        log.warning(
            f"the tokenizer of {source} does not reproduce the text exactly (it normalizes it): decoded text and "
            "samples differ from it"
        )


def corpus_tokenizer(
    tok_cfg: TokenizerConfig,
    cfg: DataConfig,
    train: Sources,
    val: Sources | None,
    fingerprint: dict,
    val_start: int | None = None,
) -> Tokenizer:
    """`tokenizer.path`'s tokenizer, else one built from the corpus (and kept in the cache for the next run).

    A learned tokenizer sees only the training text: the text before byte `val_start`, where the validation split
    begins, or all of `data.path` when `data.val_path` is set. The char vocabulary covers validation text too.
    """
    if tok_cfg.path:
        tokenizer = load_configured(tok_cfg)
        check_round_trip(tokenizer, train, cfg, f"tokenizer.path={tok_cfg.path}")
        return tokenizer
    cached = None
    if cfg.cache:
        parts = {"version": CACHE_VERSION, "kind": tok_cfg.kind, "vocab_size": tok_cfg.vocab_size, **fingerprint}
        parts.update(separator=cfg.separator, encoding_errors=cfg.encoding_errors, val_fraction=cfg.val_fraction)
        cached = Path(cfg.cache_dir).expanduser() / "tokenizers" / f"{_key(parts)}.json"
        if cached.is_file():
            try:
                check_tokenizer_digest(cached)
                tokenizer = load_tokenizer(cached, "data.cache_dir")
                if tokenizer.kind != tok_cfg.kind:  # its name is a hash of the settings, the kind among them
                    raise FluxtrainError(f"{cached} holds a {tokenizer.kind} tokenizer, not a {tok_cfg.kind} one")
            except FluxtrainError as e:
                log.warning(f"tokenizer: discarding the cached tokenizer ({e}); building it again")
            else:
                log.info(f"tokenizer: reusing {cached}")
                return tokenizer

    def stream(sources: Sources) -> Iterator[str]:
        return iter_text(sources, cfg.separator, cfg.encoding_errors)

    if val is not None:
        corpus = (p for s in (train, val) for p in stream(s))
        train_text = stream(train)
    else:
        corpus = stream(train)
        train_text = head_text(stream(train), val_start)
    # Small pieces: the trainer buffers a few hundred pieces ahead, so memory follows the piece size.
    tokenizer = build_tokenizer(tok_cfg, corpus, trainer_pieces(train_text))
    if cached is not None:
        for sources, name in ((train, "train"), (val, "val")):  # as for the token ids: no entry for other content
            if sources is not None:
                check_unchanged(sources, fingerprint[name])
        text = tokenizer.to_json()
        # The tokenizer, then the digest that vouches for it: a crash in between leaves one no digest vouches for.
        remove_dead_writes(cached.parent)
        with writing_cache(cfg.cache_dir):
            atomic_write_text(cached, text)
            atomic_write_text(digest_path(cached), hashlib.blake2b(text.encode("utf-8")).hexdigest())
    return tokenizer


def digest_path(cached: Path) -> Path:
    return cached.with_suffix(".blake2b")


def check_tokenizer_digest(cached: Path) -> None:
    """A cached tokenizer must be the one written: a damaged file that still parses (a merge lost, a character
    changed) would otherwise train a run with another tokenizer than its settings ask for."""
    if not digest_path(cached).is_file():
        raise FluxtrainError(f"{cached} has no digest {digest_path(cached).name} vouching for it")
    try:
        expected = digest_path(cached).read_text(encoding="utf-8").strip()
        actual = hashlib.blake2b(cached.read_bytes()).hexdigest()
    except (OSError, UnicodeDecodeError) as e:
        raise FluxtrainError(f"{digest_path(cached)} cannot be read: {describe_failure(e)}") from None
    if actual != expected:
        raise FluxtrainError(f"{cached} does not match the blake2b digest in {digest_path(cached).name}")


# ----------------------------------------------------------------------------------------------------------------------
# Batches


def val_start_byte(n_bytes: int, val_fraction: float) -> int:
    """Where the validation split starts in a text of `n_bytes` bytes (UTF-8): its last `val_fraction`. Measured in
    text, not tokens, so that every tokenizer validates on the same text, and a trained one sees none of it."""
    return n_bytes - int(n_bytes * val_fraction)


class TokenData:
    """Train and validation token ids (numpy arrays, usually memmaps of the cache) and random windows of them."""

    def __init__(self, train: np.ndarray, val: np.ndarray, seq_len: int, source: str, val_bytes: int):
        for name, part in (("train", train), ("val", val)):
            if len(part) < seq_len + 1:
                raise FluxtrainError(
                    f"{source} is too short: its {name} split has {len(part)} tokens, "
                    f"fewer than model.seq_len + 1 = {seq_len + 1}"
                )
        self.train, self.val = train, val
        self.seq_len = seq_len
        self.val_bytes = val_bytes
        # Bytes per token of the validation split, to report the validation loss in bits per byte whatever the
        # tokenizer: bpb = loss / ln 2 * val tokens / val bytes.
        self.bytes_per_token = val_bytes / len(val)
        self._window = np.arange(seq_len + 1)

    def split(self, name: str) -> np.ndarray:
        """The token ids of the split `name`: "train" or "val"."""
        if name not in ("train", "val"):  # anything else read as validation would train a hand-written loop on it
            raise FluxtrainError(f"split {name!r} is not 'train' or 'val'")
        return self.train if name == "train" else self.val

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and the next-token targets y (B, T), int64."""
        data = self.split(split)
        if not (isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size >= 1):
            raise FluxtrainError(f"batch_size={batch_size!r} must be a positive integer")
        starts = torch.randint(len(data) - self.seq_len, (batch_size,), generator=generator)
        offsets = starts.numpy()[:, None] + self._window  # (B, T + 1)
        window = torch.from_numpy(data[offsets].astype(np.int64))
        return window[:, :-1], window[:, 1:]


def check_val_split(source: str, n_tokens: int, n_val: int, val_fraction: float, seq_len: int) -> None:
    """A split too short for one window, where the other has tokens to spare, is an error naming data.val_fraction
    (TokenData says when neither is long enough)."""
    if n_val < seq_len + 1 <= n_tokens - n_val:
        raise FluxtrainError(
            f"{source} is too short: its val split has {n_val} tokens (the last data.val_fraction={val_fraction} of "
            f"the text, {n_tokens:,} tokens in all), fewer than model.seq_len + 1 = {seq_len + 1}; raise "
            "data.val_fraction, lower model.seq_len or set data.val_path"
        )
    if n_tokens - n_val < seq_len + 1 <= n_val:
        raise FluxtrainError(
            f"{source} is too short: its train split has {n_tokens - n_val} tokens (all but the last "
            f"data.val_fraction={val_fraction} of the text, {n_tokens:,} tokens in all), fewer than model.seq_len + 1 "
            f"= {seq_len + 1}; lower data.val_fraction or model.seq_len"
        )


def check_separator(cfg: DataConfig, tokenizer: Tokenizer, sources: list[Sources], tokenizer_source: str) -> None:
    """`data.separator`, put between files, must encode: a character of it the tokenizer lacks is named as the
    separator's, not as one of the files'."""
    if not cfg.separator or all(len(s.files) < 2 for s in sources):
        return
    try:
        tokenizer.encode(cfg.separator)
    except EncodeError as e:
        raise FluxtrainError(
            f"data.separator={cfg.separator!r}, put between files: {e} (the tokenizer comes from {tokenizer_source})"
        ) from None


def load_corpus(
    cfg: DataConfig,
    tok_cfg: TokenizerConfig,
    seq_len: int,
    run_dir: str | Path | None = None,
    tokenizer: Tokenizer | None = None,
) -> tuple[TokenData, Tokenizer, str]:
    """Find and read the corpus, build (or load) the tokenizer, encode once (or reuse the cache) and split.

    `run_dir`, the folder the run writes into, is never read as data. A given `tokenizer` (a model's, for
    `init_from`) encodes the text instead of the one `tok_cfg` describes. Returns the data, the tokenizer and a
    one-line description of the sources for the log.
    """
    if not (isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len >= 1):
        raise FluxtrainError(f"seq_len={seq_len!r} must be a positive integer (the model's context, model.seq_len)")
    validate(cfg)
    validate_tokenizer(tok_cfg)
    warn_unused(tok_cfg)
    check_cache_dir(cfg)
    if (separator := separator_text(cfg.separator)) != cfg.separator:
        change = {"separator": separator}
        cfg = dataclasses.replace(cfg, **change) if dataclasses.is_dataclass(cfg) else OmegaConf.merge(cfg, change)
    train_src, val_src = corpus_sources(cfg, run_dir)
    for sources in (train_src, val_src):
        if sources is not None:
            log.info(f"data: {sources.describe()}")
    fingerprint = {"train": sources_fingerprint(train_src) if cfg.cache else None}
    fingerprint["val"] = sources_fingerprint(val_src) if cfg.cache and val_src else None
    # Without data.val_path, the validation text is the last val_fraction of the text: the same text whatever the
    # tokenizer, and none of it seen by a trained one. The two parts are encoded apart, each a cache entry.
    val_start = None
    if val_src is None:
        val_start = val_start_byte(text_bytes(train_src, cfg.separator, cfg.encoding_errors), cfg.val_fraction)
    if tokenizer is not None:
        tokenizer_source = "init_from"
        check_round_trip(tokenizer, train_src, cfg, tokenizer_source)
    else:
        tokenizer = corpus_tokenizer(tok_cfg, cfg, train_src, val_src, fingerprint, val_start)
        tokenizer_source = "tokenizer.path" if tok_cfg.path else BUILT_FROM_TEXT
    check_separator(cfg, tokenizer, [s for s in (train_src, val_src) if s is not None], tokenizer_source)
    source = train_src.setting if val_src is None else f"{train_src.setting} ({val_src.setting})"
    if val_src is not None:
        train_ids, _ = encode_sources(train_src, tokenizer, cfg, fingerprint["train"], tokenizer_source)
        val_ids, val_bytes = encode_sources(val_src, tokenizer, cfg, fingerprint["val"], tokenizer_source)
    else:
        parts = [
            encode_sources(train_src, tokenizer, cfg, fingerprint["train"], tokenizer_source, (name, val_start))
            for name in ("train", "val")
        ]
        (train_ids, _), (val_ids, val_bytes) = parts
        check_val_split(source, len(train_ids) + len(val_ids), len(val_ids), cfg.val_fraction, seq_len)
    data = TokenData(np.asarray(train_ids), np.asarray(val_ids), seq_len, source, val_bytes)
    return data, tokenizer, source
