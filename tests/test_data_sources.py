"""Data sources and encoding: file/folder/glob selection, binary and UTF-8 handling, chunked encoding, the memmap
cache, the validation split and bits per byte."""

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fluxtrain.data as data_mod
import fluxtrain.sources as sources_mod
from fluxtrain.data import (
    DataConfig,
    id_dtype,
    iter_text,
    load_corpus,
    read_corpus,
    resolve_sources,
    safe_chunks,
)
from fluxtrain.errors import FluxtrainError
from fluxtrain.tokenizer import BPETokenizer, CharTokenizer, TokenizerConfig
from fluxtrain.train import train

from .conftest import compose_config, make_text


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    write(root / "b.py", "B = 2\n")
    write(root / "a.py", "A = 1\n")
    write(root / "pkg" / "mod.py", "def f():\n    return 3\n")
    write(root / "pkg" / "notes.md", "# notes\n")
    write(root / "pkg" / "tests" / "test_mod.py", "assert True\n")
    write(root / "logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    write(root / "empty.txt", "")
    write(root / ".git" / "config", "[core]\n")
    write(root / ".hidden.py", "SECRET = 1\n")
    return root


def rel(sources, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in sources.files]


def test_folder_reads_all_text_files_sorted_skipping_hidden_binary_and_empty(tree):
    sources = resolve_sources(str(tree))
    assert rel(sources, tree) == ["a.py", "b.py", "pkg/mod.py", "pkg/notes.md", "pkg/tests/test_mod.py"]
    assert (sources.n_binary, sources.n_empty) == (1, 1)
    assert sources.n_bytes == sum(p.stat().st_size for p in sources.files)
    assert "5 file(s)" in sources.describe() and "1 binary and 1 empty file(s) skipped" in sources.describe()


def test_include_and_exclude(tree):
    assert rel(resolve_sources(str(tree), include=["*.py"]), tree) == [
        "a.py",
        "b.py",
        "pkg/mod.py",
        "pkg/tests/test_mod.py",
    ]
    assert rel(resolve_sources(str(tree), include=["*.py"], exclude=["pkg/tests/*", "b.py"]), tree) == [
        "a.py",
        "pkg/mod.py",
    ]
    assert rel(resolve_sources(str(tree), include=["pkg/*.md"]), tree) == ["pkg/notes.md"]
    kept = resolve_sources(str(tree), include=["*.py"], exclude=["pkg/tests/*"])
    # notes.md, test_mod.py, and logo.png and empty.txt, which include/exclude drop before they are looked into
    assert kept.describe().endswith("3 file(s), 34 bytes (4 file(s) left out by include/exclude)")


def test_one_glob_given_as_text_is_one_glob_not_its_characters(tree):
    """From Python, `include="*.py"` is one pattern: as a list of characters, '*' would keep every file."""
    assert rel(resolve_sources(str(tree), include="*.md"), tree) == ["pkg/notes.md"]
    assert rel(resolve_sources(str(tree), include=["*.py"], exclude="pkg/*"), tree) == ["a.py", "b.py"]


def test_batches_come_from_a_split_named_train_or_val_and_a_positive_context(tmp_path):
    path = write(tmp_path / "a.txt", make_text(3_000))
    data, _, _ = load_corpus(corpus_cfg(tmp_path, path), TokenizerConfig(), 16)
    with pytest.raises(ValueError, match="split 'training' is not 'train' or 'val'"):
        data.get_batch("training", 2, torch.Generator().manual_seed(0))
    for seq_len in (0, -5, "32", True):
        with pytest.raises(FluxtrainError, match=r"^seq_len=.* must be a positive integer"):
            load_corpus(corpus_cfg(tmp_path, path), TokenizerConfig(), seq_len)


def test_a_double_star_folder_in_include_or_exclude_also_stands_for_no_folder(tree):
    """As in a recursive glob: `**/*.py` matches a.py at the top too, `pkg/**/*.py` matches pkg/mod.py."""
    every_py = ["a.py", "b.py", "pkg/mod.py", "pkg/tests/test_mod.py"]
    assert rel(resolve_sources(str(tree), include=["**/*.py"]), tree) == every_py
    assert rel(resolve_sources(str(tree), include=["pkg/**/*.py"]), tree) == ["pkg/mod.py", "pkg/tests/test_mod.py"]
    assert rel(resolve_sources(str(tree), include=["**/pkg/**/test_*.py"]), tree) == ["pkg/tests/test_mod.py"]
    assert rel(resolve_sources(str(tree), exclude=["pkg/**/*"]), tree) == ["a.py", "b.py"]
    write(tree / "sub" / "xy.txt", "text\n")  # `x**/y.txt` is no `**/` folder: dropping it would match xy.txt
    assert rel(resolve_sources(str(tree), include=["x**/y.txt", "*.md"]), tree) == ["pkg/notes.md"]


def test_glob(tree):
    assert rel(resolve_sources(f"{tree}/**/*.py"), tree) == ["a.py", "b.py", "pkg/mod.py", "pkg/tests/test_mod.py"]
    assert rel(resolve_sources(f"{tree}/*.py", exclude=["a.py"]), tree) == ["b.py"]


def test_selection_errors_name_the_setting(tree):
    with pytest.raises(FluxtrainError, match=r"data.path: file .*nothing does not exist"):
        resolve_sources(str(tree / "nothing"))
    with pytest.raises(FluxtrainError, match=r"data.path=.*\*.rs: the glob matches no files"):
        resolve_sources(f"{tree}/**/*.rs")
    with pytest.raises(FluxtrainError, match=r"data.path=.*: no text files found with include=\['\*.rs'\]"):
        resolve_sources(str(tree), include=["*.rs"])
    with pytest.raises(FluxtrainError, match="data.path: file .*empty.txt is empty"):
        resolve_sources(str(tree / "empty.txt"))


@pytest.mark.parametrize("pattern", ["{folder}", "{folder}/*.txt"])
def test_broken_links_are_skipped_with_a_warning_naming_them(tmp_path, caplog, pattern):
    folder = tmp_path / "link"
    write(folder / "good.txt", "hello\n")
    (folder / "broken.txt").symlink_to(tmp_path / "nowhere")
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        sources = resolve_sources(pattern.format(folder=folder))
    assert rel(sources, folder) == ["good.txt"] and sources.n_broken == 1
    assert sources.describe().endswith("6 bytes (1 broken link(s) skipped)")
    assert any(
        f"skipping 1 broken link(s): {folder / 'broken.txt'} -> {tmp_path / 'nowhere'}" in r.message
        for r in caplog.records
    )
    (folder / "good.txt").unlink()
    with pytest.raises(FluxtrainError, match=r"no text files found \(only 1 broken link\(s\), which are skipped\)"):
        resolve_sources(pattern.format(folder=folder))
    with pytest.raises(FluxtrainError, match=r"data.path: .*broken.txt is a broken link to .*nowhere$"):
        resolve_sources(str(folder / "broken.txt"))
    (folder / "x1").symlink_to(folder / "x2")
    (folder / "x2").symlink_to(folder / "x1")
    with pytest.raises(FluxtrainError, match=r"^data.path: .*x1 is a link in a loop of links$"):
        resolve_sources(str(folder / "x1"))


def test_a_binary_file_named_by_itself_is_an_error(tmp_path):
    """Valid UTF-8 with NUL bytes (UTF-16 text, say) would otherwise be trained on; a folder skips such a file."""
    path = write(tmp_path / "utf16.txt", "hello world".encode("utf-16-le"))
    with pytest.raises(FluxtrainError) as e:
        resolve_sources(str(path), setting="data.val_path")
    assert str(e.value) == f"data.val_path: {path} is a binary file (a NUL byte in its first 8000 bytes)"
    marked = write(tmp_path / "bom.txt", "hello world".encode("utf-16"))  # with its byte-order mark
    with pytest.raises(FluxtrainError) as e:
        resolve_sources(str(marked))
    assert str(e.value) == f"data.path: {marked} is UTF-16 text; convert it to UTF-8 (e.g. with iconv)"


def test_what_is_not_a_regular_file_is_named_so(tmp_path):
    fifo = tmp_path / "folder" / "fifo"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    for path in (fifo, Path(os.devnull)):
        with pytest.raises(FluxtrainError, match=rf"data.path: {path} is not a regular file or a folder$"):
            resolve_sources(str(path))
    write(fifo.parent / "a.txt", "text\n")
    assert rel(resolve_sources(str(fifo.parent)), fifo.parent) == ["a.txt"]  # the FIFO is never opened


def test_no_text_files_message_says_what_was_found(tmp_path, tree):
    write(tmp_path / "hidden" / ".notes.txt", "hidden\n")
    write(tmp_path / "hidden" / ".git" / "config", "[core]\n")
    with pytest.raises(FluxtrainError, match=r"found \(only 2 hidden file\(s\) or folder\(s\), which are skipped\)$"):
        resolve_sources(str(tmp_path / "hidden"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FluxtrainError, match=r"no text files found \(the folder is empty\)$"):
        resolve_sources(str(tmp_path / "empty"))
    with pytest.raises(
        FluxtrainError,
        match=r"with include=\['\*.png', '\*.txt'\] \(only 2 hidden file\(s\) or folder\(s\), "
        r"5 file\(s\) left out by include/exclude, 1 binary file\(s\), 1 empty file\(s\), which",
    ):
        resolve_sources(str(tree), include=["*.png", "*.txt"])


def test_files_are_joined_in_order_with_the_separator(tree):
    sources = resolve_sources(str(tree), include=["*.py"], exclude=["pkg/*"])
    assert read_corpus(sources, separator="\n<|file|>\n") == "A = 1\n\n<|file|>\nB = 2\n"


def test_config_accepts_lists_from_the_command_line():
    cfg = compose_config(["data.path=fluxtrain/", "data.include=[*.py]", "data.exclude=[__init__.py,test_*]"])
    assert list(cfg.data.include) == ["*.py"] and list(cfg.data.exclude) == ["__init__.py", "test_*"]


def test_invalid_utf8_is_an_error_with_file_and_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "READ_BLOCK", 5)  # the bad byte lies several blocks in, after a split character
    bad = write(tmp_path / "bad.txt", "héllo wörld ".encode() + b"\xff tail")
    with pytest.raises(FluxtrainError, match=r"data.path: .*bad.txt is not valid UTF-8 \(byte offset 14\)"):
        read_corpus(resolve_sources(str(bad)))


def test_replace_mode_reads_with_replacement_characters_and_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources_mod, "READ_BLOCK", 5)
    bad = write(tmp_path / "bad.txt", "héllo wörld ".encode() + b"\xff tail")
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        text = read_corpus(resolve_sources(str(bad)), encoding_errors="replace")
    assert text == "héllo wörld \ufffd tail"
    assert any("bad.txt is not valid UTF-8 (first bad byte at offset 14)" in r.message for r in caplog.records)


def test_a_byte_order_mark_is_not_text(tmp_path, monkeypatch):
    bom = "\ufeff".encode()
    write(tmp_path / "corpus" / "a.txt", bom + b"one\r\n")
    write(tmp_path / "corpus" / "b.txt", bom + b"two \xef\xbb\xbf")  # only a leading one is a signature
    write(tmp_path / "corpus" / "c.txt", bom)  # no text: skipped as empty, and an error when named
    sources = resolve_sources(str(tmp_path / "corpus"))
    assert read_corpus(sources) == "one\r\n\ntwo \ufeff" and sources.n_empty == 1
    with pytest.raises(FluxtrainError, match="c.txt is empty"):
        resolve_sources(str(tmp_path / "corpus" / "c.txt"))
    monkeypatch.setattr(sources_mod, "READ_BLOCK", 4)
    bad = write(tmp_path / "bad.txt", bom + b"abc\xff")
    with pytest.raises(FluxtrainError, match=r"bad.txt is not valid UTF-8 \(byte offset 6\)"):  # in the file's bytes
        read_corpus(resolve_sources(str(bad)))


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("in_folder", [False, True])
def test_replace_mode_warns_once_a_run_cached_or_not(tmp_path, monkeypatch, caplog, kind, in_folder):
    bad = write(tmp_path / "corpus" / "bad.txt", b"abc\xff" + make_text(3_000).encode())
    if in_folder:
        write(tmp_path / "corpus" / "good.txt", make_text(2_000, seed=1))
    path = bad.parent if in_folder else bad
    tok_cfg = TokenizerConfig(kind=kind, vocab_size=300)
    calls = count_encodes(monkeypatch)
    expected = [f"{bad} is not valid UTF-8 (first bad byte at offset 3); read with U+FFFD for them"]
    for cache, n_encodes in ((False, 2), (True, 4), (True, 4)):  # no cache, a fresh cache, then a cache hit
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fluxtrain.sources"):
            load_corpus(corpus_cfg(tmp_path, path, encoding_errors="replace", cache=cache), tok_cfg, 16)
        assert [r.message for r in caplog.records if "UTF-8" in r.message] == expected
        assert len(calls) == n_encodes


def test_a_cache_entry_that_does_not_record_invalid_utf8_is_encoded_again_in_replace_mode(tmp_path, caplog):
    bad = write(tmp_path / "bad.txt", b"abc\xff" + make_text(3_000).encode())
    cfg = corpus_cfg(tmp_path, bad, encoding_errors="replace")
    load_corpus(cfg, TokenizerConfig(), 16)
    entry = token_entry(tmp_path)
    meta = json.loads(entry.read_text())
    assert meta["not_utf8"] == [[0, 3]]
    del meta["not_utf8"]  # as an entry written before the key existed
    entry.write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        load_corpus(cfg, TokenizerConfig(), 16)
    assert [r.message for r in caplog.records] == [
        f"{bad} is not valid UTF-8 (first bad byte at offset 3); read with U+FFFD for them",  # as its size is counted
        f"data.path={bad}: discarding the token cache entry {entry.with_suffix('.bin')} ({entry.name} does not say "
        "which files are not valid UTF-8 (an older fluxtrain wrote it)); encoding again",
    ]
    assert json.loads(entry.read_text())["not_utf8"] == [[0, 3]]


def test_encoding_errors_setting_is_checked(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "a.txt", "abc")), encoding_errors="ignore")
    with pytest.raises(FluxtrainError, match="data.encoding_errors='ignore' is not one of strict, replace"):
        load_corpus(cfg, TokenizerConfig(), 4)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked encoding


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    # Indented source and runs of blank lines teach merges of whitespace runs ("\n    ", "\n\n"), the ids that a
    # careless cut inside whitespace would change.
    source = read_corpus(resolve_sources("fluxtrain", include=["*.py"]))
    text = make_text(20_000) + "\n\n\n" + source + "  x  \t\r\n\r\n  \n\n"
    return BPETokenizer.train(text, vocab_size=600)


def encode_chunked(tokenizer, text: str, target: int, piece: int) -> list[int]:
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    chunks = list(safe_chunks(pieces, target))
    assert "".join(chunks) == text
    return [i for c in chunks for i in tokenizer.encode(c)]


_alphabet = st.sampled_from(
    list("ab Z9_.:'\"-\n\t\r") + ["    ", "\n    ", "\n\n", "\r\n", "é", "雷", "🌩", "\u00a0", "\u2028", "'s", "'ll"]
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(_alphabet, max_size=80), target=st.integers(1, 12), piece=st.integers(1, 9))
def test_chunked_bpe_encoding_equals_whole_text_encoding(bpe, parts, target, piece):
    text = "".join(parts)
    assert encode_chunked(bpe, text, target, piece) == bpe.encode(text)


def test_chunked_encoding_of_real_text(bpe, shakespeare):
    text = shakespeare.read_text()[:200_000]
    whole = bpe.encode(text)
    assert encode_chunked(bpe, text, 1000, 7777) == whole
    char = CharTokenizer.train(text)
    assert encode_chunked(char, text, 1000, 7777) == char.encode(text)


def test_chunked_encoding_of_python_source(bpe):
    text = read_corpus(resolve_sources("fluxtrain", include=["*.py"]))
    assert encode_chunked(bpe, text, 500, 3000) == bpe.encode(text)


# ----------------------------------------------------------------------------------------------------------------------
# The memmap cache


def corpus_cfg(tmp_path: Path, path: Path, **overrides) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **overrides)


def token_entry(tmp_path: Path, split: str = "train") -> Path:
    """The token cache entry (its .json) of one split of the text."""
    (entry,) = (
        p for p in (tmp_path / "cache" / "tokens").glob("*.json") if json.loads(p.read_text())["split"][0] == split
    )
    return entry


def count_encodes(monkeypatch) -> list[int]:
    """The calls that encode text: two for each corpus without data.val_path (its train and val splits)."""
    calls: list[int] = []
    real = data_mod.encode_stream

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "encode_stream", counting)
    return calls


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_second_run_reuses_the_cache_and_a_changed_file_invalidates_it(tmp_path, monkeypatch, kind):
    folder = tmp_path / "corpus"
    write(folder / "one.txt", make_text(6_000, seed=1))
    write(folder / "two.txt", make_text(6_000, seed=2))
    cfg, tok_cfg = corpus_cfg(tmp_path, folder), TokenizerConfig(kind=kind, vocab_size=300)
    calls = count_encodes(monkeypatch)

    first, tok1, _ = load_corpus(cfg, tok_cfg, 16)
    assert len(calls) == 2
    assert isinstance(first.train.base, np.memmap) and first.train.dtype == np.uint16
    ids = np.concatenate([first.train, first.val])
    assert tok1.decode(ids.tolist()) == read_corpus(resolve_sources(str(folder)))

    second, tok2, _ = load_corpus(cfg, tok_cfg, 16)
    assert len(calls) == 2  # nothing re-encoded (and the BPE not retrained: same ids)
    assert tok2.to_json() == tok1.to_json()
    assert np.array_equal(np.concatenate([second.train, second.val]), ids)

    write(folder / "two.txt", make_text(6_000, seed=3))  # same size, other content
    third, _, _ = load_corpus(cfg, tok_cfg, 16)
    assert len(calls) == 4
    assert not np.array_equal(np.concatenate([third.train, third.val]), ids)


def test_cache_off_encodes_in_memory(tmp_path, monkeypatch):
    path = write(tmp_path / "a.txt", make_text(3_000))
    calls = count_encodes(monkeypatch)
    for _ in range(2):
        data, _, _ = load_corpus(corpus_cfg(tmp_path, path, cache=False), TokenizerConfig(), 16)
    assert len(calls) == 4 and not (tmp_path / "cache").exists()
    assert not isinstance(data.train.base, np.memmap)


def test_unusable_cache_dir_is_an_error_before_any_work(tmp_path, monkeypatch):
    path = write(tmp_path / "a.txt", make_text(3_000))
    a_file = write(tmp_path / "file", "x")
    calls = count_encodes(monkeypatch)
    fix = "; set data.cache_dir to a writable folder or data.cache=false"
    cases = [
        (a_file, "is a file, not a folder"),
        (a_file / "sub", f"cannot be written: {a_file} is a file, not a folder"),
    ]
    if Path("/proc/self").is_dir():  # a folder nobody may create files in, even root
        cases.append((Path("/proc/self"), "cannot be written: cannot create a file in /proc/self (No such file"))
        cases.append((Path("/proc/nope"), "cannot be written: cannot create a file in /proc (No such file"))
    for cache_dir, problem in cases:
        cfg = DataConfig(path=str(path), cache_dir=str(cache_dir))
        with pytest.raises(FluxtrainError) as e:
            load_corpus(cfg, TokenizerConfig(), 16)
        assert str(e.value).startswith(f"data.cache_dir={cache_dir} {problem}") and str(e.value).endswith(fix)
        assert "\n" not in str(e.value)
    assert calls == []
    cfg = DataConfig(path=str(path), cache_dir=str(a_file / "sub"), cache=False)  # the folder is not needed
    load_corpus(cfg, TokenizerConfig(), 16)
    assert len(calls) == 2


def test_a_file_in_the_cache_folder_where_a_folder_goes_is_an_error_before_any_work(tmp_path, monkeypatch):
    path = write(tmp_path / "a.txt", make_text(3_000))
    write(tmp_path / "cache" / "tokens", "x")
    calls = count_encodes(monkeypatch)
    with pytest.raises(FluxtrainError) as e:
        load_corpus(corpus_cfg(tmp_path, path), TokenizerConfig(), 16)
    assert str(e.value) == (
        f"data.cache_dir={tmp_path / 'cache'} holds a file {tmp_path / 'cache' / 'tokens'} where a folder goes; "
        "set data.cache_dir to a writable folder or data.cache=false"
    )
    assert calls == []


@pytest.mark.parametrize("step", ["build_tokenizer", "encode_stream"])
def test_a_file_that_changes_while_it_is_read_leaves_no_cache_entry(tmp_path, monkeypatch, step):
    """Entries are keyed by the content hashed first: a tokenizer or ids made from other content under that key
    would be read by a later run on the first content."""
    first = make_text(3_000, seed=1)
    path = write(tmp_path / "a.txt", first)
    cfg = corpus_cfg(tmp_path, path)
    real = getattr(data_mod, step)

    def changing(*args, **kwargs):
        write(path, make_text(3_000, seed=2))
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, step, changing)
    with pytest.raises(FluxtrainError, match=f"^data.path={path}: {path} changed while it was read; run again"):
        load_corpus(cfg, TokenizerConfig(), 16)
    assert not list((tmp_path / "cache" / ("tokenizers" if step == "build_tokenizer" else "tokens")).glob("*"))
    write(path, first)  # back to the content the run started from
    monkeypatch.setattr(data_mod, step, real)
    data, tok, _ = load_corpus(cfg, TokenizerConfig(), 16)
    assert tok.decode(np.concatenate([data.train, data.val]).tolist()) == first


def damage_json(entry: Path, vocab_size: int) -> None:
    entry.write_text('{"n_tokens": 12')


def damage_random_bytes(entry: Path, vocab_size: int) -> None:
    ids = entry.with_suffix(".bin")
    ids.write_bytes(np.full(ids.stat().st_size // 2, 65_000, np.uint16).tobytes())  # ids far outside the vocabulary


def damage_in_range(entry: Path, vocab_size: int) -> None:
    ids = entry.with_suffix(".bin")
    garbage = np.random.default_rng(0).integers(0, vocab_size, ids.stat().st_size // 2, dtype=np.uint16)
    ids.write_bytes(garbage.tobytes())


def damage_in_range_with_matching_digest(entry: Path, vocab_size: int) -> None:
    damage_random_bytes(entry, vocab_size)
    meta = json.loads(entry.read_text())
    digest = hashlib.blake2b(entry.with_suffix(".bin").read_bytes())
    digest.update(data_mod.byte_count_record(meta["n_bytes"]))
    meta["blake2b"] = digest.hexdigest()
    entry.write_text(json.dumps(meta))


def damage_byte_count(entry: Path, vocab_size: int) -> None:
    meta = json.loads(entry.read_text())
    meta["n_bytes"] = 0  # val/bpb would divide by it
    entry.write_text(json.dumps(meta))


def damage_truncated(entry: Path, vocab_size: int) -> None:
    ids = entry.with_suffix(".bin")
    ids.write_bytes(ids.read_bytes()[:-2])


def damage_deep_json(entry: Path, vocab_size: int) -> None:
    entry.write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python's recursion limit


def damage_no_digest(entry: Path, vocab_size: int) -> None:
    meta = json.loads(entry.read_text())
    del meta["blake2b"]
    entry.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (damage_json, "json is not a valid entry: JSONDecodeError"),
        (damage_random_bytes, "bin and its byte count do not match the blake2b digest"),
        (damage_in_range, "bin and its byte count do not match the blake2b digest"),
        (damage_byte_count, "bin and its byte count do not match the blake2b digest"),
        (damage_in_range_with_matching_digest, "bin holds id 65000, outside the vocabulary of"),
        (damage_truncated, "bin does not hold"),
        (damage_no_digest, "json has no digest of the ids"),
        (damage_deep_json, "json is not a valid entry: ValueError: JSON nested too deeply"),
    ],
)
def test_a_damaged_cache_entry_is_discarded_and_encoded_again(tmp_path, monkeypatch, caplog, damage, reason):
    path = write(tmp_path / "a.txt", make_text(3_000))
    cfg = corpus_cfg(tmp_path, path)
    first, tok, _ = load_corpus(cfg, TokenizerConfig(), 16)
    expected = np.concatenate([first.train, first.val])  # a copy: damaging the file in place changes the memmap
    entry = token_entry(tmp_path)
    damage(entry, tok.vocab_size)
    calls = count_encodes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        second, _, _ = load_corpus(cfg, TokenizerConfig(), 16)
    assert len(calls) == 1
    assert any("discarding the token cache entry" in r.message and reason in r.message for r in caplog.records)
    assert np.array_equal(np.concatenate([second.train, second.val]), expected)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        load_corpus(cfg, TokenizerConfig(), 16)  # the new entry is sound
    assert len(calls) == 1 and not caplog.records


def drop_last_merge(text: str) -> str:
    """A BPE tokenizer file with its last merge and token gone: still a valid tokenizer, with one id fewer."""
    entry = json.loads(text)
    tok = json.loads(entry["tokenizer"])
    merge = tok["model"]["merges"].pop()
    del tok["model"]["vocab"]["".join(merge.split(" ") if isinstance(merge, str) else merge)]
    return json.dumps({**entry, "tokenizer": json.dumps(tok)})


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda cached: cached.write_text("{"), "does not match the blake2b digest"),
        # Still a tokenizer, of 299 ids where tokenizer.vocab_size asks for 300: only the digest shows it.
        (lambda cached: cached.write_text(drop_last_merge(cached.read_text())), "does not match the blake2b digest"),
        (lambda cached: cached.with_suffix(".blake2b").unlink(), "has no digest"),
        # Another kind, with a digest of its own (written by hand, say)
        (
            lambda cached: (
                cached.write_text(CharTokenizer(list("ab")).to_json()),
                cached.with_suffix(".blake2b").write_text(hashlib.blake2b(cached.read_bytes()).hexdigest()),
            ),
            "holds a char tokenizer, not a bpe one",
        ),
    ],
)
def test_a_damaged_cached_tokenizer_is_built_again(tmp_path, caplog, damage, reason):
    path = write(tmp_path / "a.txt", make_text(3_000))
    cfg, tok_cfg = corpus_cfg(tmp_path, path), TokenizerConfig(kind="bpe", vocab_size=300)
    first, tok1, _ = load_corpus(cfg, tok_cfg, 16)
    (cached,) = (tmp_path / "cache" / "tokenizers").glob("*.json")
    damage(cached)
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        second, tok2, _ = load_corpus(cfg, tok_cfg, 16)
    assert any("discarding the cached tokenizer" in r.message and reason in r.message for r in caplog.records)
    assert tok2.to_json() == tok1.to_json() and tok2.vocab_size == 300 and np.array_equal(second.train, first.train)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        load_corpus(cfg, tok_cfg, 16)  # rebuilt with its digest: reused without a word
    assert not caplog.records


def test_id_dtype():
    assert id_dtype(256) == np.uint16 and id_dtype(65536) == np.uint16 and id_dtype(65537) == np.uint32


def test_get_batch_windows(tmp_path):
    path = write(tmp_path / "a.txt", make_text(5_000))
    data, _, _ = load_corpus(corpus_cfg(tmp_path, path), TokenizerConfig(), 16)
    x, y = data.get_batch("train", 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # The same windows as gathering from an in-memory tensor with the same generator.
    tensor = torch.from_numpy(data.train.astype(np.int64))
    starts = torch.randint(len(tensor) - 16, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, tensor[starts[:, None] + torch.arange(16)])


# ----------------------------------------------------------------------------------------------------------------------
# Splits and bits per byte


def test_val_split_is_the_last_fraction_of_the_text(tmp_path):
    text = make_text(10_000)
    path = write(tmp_path / "a.txt", text)
    data, tok, _ = load_corpus(corpus_cfg(tmp_path, path, val_fraction=0.25), TokenizerConfig(), 16)
    assert len(data.val) == int(len(text) * 0.25)
    assert tok.decode(data.val.tolist()) == text[len(text) - len(data.val) :]


def test_the_val_split_is_the_same_text_for_every_tokenizer_and_a_trained_bpe_never_sees_it(tmp_path, monkeypatch):
    """The split is the last val_fraction of the text's bytes, not of its tokens: a BPE that packs the tail tighter
    than the head (a repetitive tail here) would otherwise validate on text it was trained on, and the tokenizers
    would validate on different texts. Files that start with a byte order mark (not text) and hold multi-byte
    characters are counted as read."""
    bom = "\ufeff".encode()
    head = [
        write(tmp_path / "corpus" / f"{i:03}.txt", bom + (f"Ünïcödé line {i}, " + make_text(300)).encode())
        for i in range(40)
    ]
    write(tmp_path / "corpus" / "zz_tail.txt", " the" * 1_500)
    text = read_corpus(resolve_sources(str(tmp_path / "corpus")))
    assert len(head) == 40 and not text.startswith("\ufeff")
    n_bytes = len(text.encode("utf-8"))
    start = n_bytes - int(n_bytes * 0.1)  # the byte the validation text starts at
    trained_on: list[str] = []
    real_train = BPETokenizer.train.__func__

    def recording_train(cls, pieces, vocab_size):
        pieces = list(pieces)
        trained_on.append("".join(pieces))
        return real_train(cls, pieces, vocab_size)

    monkeypatch.setattr(BPETokenizer, "train", classmethod(recording_train))
    cfg = corpus_cfg(tmp_path, tmp_path / "corpus", val_fraction=0.1)
    val_texts = {}
    for tok_cfg in (TokenizerConfig(), TokenizerConfig(kind="bpe", vocab_size=400)):
        data, tok, _ = load_corpus(cfg, tok_cfg, 16)
        train_text, val_text = tok.decode(data.train.tolist()), tok.decode(data.val.tolist())
        assert train_text + val_text == text
        val_texts[tok_cfg.kind] = val_text
    # Both validate on the text from that byte on, and the BPE trained on the text before it.
    assert val_texts["char"] == val_texts["bpe"] and len(val_texts["bpe"].encode("utf-8")) == n_bytes - start
    (seen,) = trained_on
    assert seen + val_texts["bpe"] == text


def test_a_val_split_too_short_for_one_window_names_val_fraction(tmp_path):
    path = write(tmp_path / "a.txt", make_text(1_000))
    with pytest.raises(FluxtrainError) as e:
        load_corpus(corpus_cfg(tmp_path, path, val_fraction=0.01), TokenizerConfig(), 16)
    assert str(e.value) == (
        f"data.path={path} is too short: its val split has 10 tokens (the last data.val_fraction=0.01 of the text, "
        "1,000 tokens in all), fewer than model.seq_len + 1 = 17; raise data.val_fraction, lower model.seq_len or set "
        "data.val_path"
    )
    with pytest.raises(FluxtrainError) as e:
        load_corpus(corpus_cfg(tmp_path, path, val_fraction=0.99), TokenizerConfig(), 16)
    assert str(e.value) == (
        f"data.path={path} is too short: its train split has 10 tokens (all but the last data.val_fraction=0.99 of "
        "the text, 1,000 tokens in all), fewer than model.seq_len + 1 = 17; lower data.val_fraction or model.seq_len"
    )
    with pytest.raises(FluxtrainError, match=r"^data.val_fraction=5.0 must be between 0 and 1$"):
        load_corpus(corpus_cfg(tmp_path, path, val_fraction=5.0, val_path=str(path)), TokenizerConfig(), 16)


def test_val_path_gives_a_separate_validation_text(tmp_path):
    train_path = write(tmp_path / "train.txt", make_text(5_000, seed=1))
    val_text = make_text(2_000, seed=2) + "\nçà"  # characters only the validation text has
    val_path = write(tmp_path / "val.txt", val_text)
    data, tok, _ = load_corpus(corpus_cfg(tmp_path, train_path, val_path=str(val_path)), TokenizerConfig(), 16)
    assert tok.decode(data.train.tolist()) == train_path.read_text()
    assert tok.decode(data.val.tolist()) == val_text
    assert data.val_bytes == len(val_text.encode("utf-8"))


def test_a_val_path_that_shares_files_with_the_training_data_is_warned_about(tmp_path, caplog):
    train_path = write(tmp_path / "texts" / "a.txt", make_text(5_000, seed=1))
    write(tmp_path / "texts" / "b.txt", make_text(2_000, seed=2))
    with caplog.at_level(logging.WARNING):
        load_corpus(corpus_cfg(tmp_path, tmp_path / "texts", val_path=str(train_path)), TokenizerConfig(), 16)
    assert f"data.val_path and data.path share 1 file(s) (e.g. {train_path.resolve()})" in caplog.text


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_bytes_per_token_is_measured_on_the_val_split(tmp_path, kind):
    # ASCII training text, then a validation tail full of 2- and 3-byte characters: a corpus-wide average
    # would be wrong for validation.
    head = make_text(12_000)
    tail = "\n".join(["ça été là — façon déjà vu € " * 4] * 12)
    path = write(tmp_path / "a.txt", head + tail)
    cfg = corpus_cfg(tmp_path, path, val_fraction=0.1)
    data, tok, _ = load_corpus(cfg, TokenizerConfig(kind=kind, vocab_size=300), 16)
    val_text = tok.decode(data.val.tolist())
    assert (head + tail).endswith(val_text) and "€" in val_text
    assert data.val_bytes == len(val_text.encode("utf-8"))
    assert data.bytes_per_token == pytest.approx(len(val_text.encode("utf-8")) / len(data.val))
    corpus_average = len((head + tail).encode("utf-8")) / (len(data.train) + len(data.val))
    assert abs(data.bytes_per_token - corpus_average) > 0.2 * corpus_average  # the average would be off


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_training_reports_val_bpb_from_val_loss(tiny_cfg, tiny_text_file, tmp_path, kind):
    cfg = tiny_cfg(f"tokenizer.kind={kind}", "tokenizer.vocab_size=300", "train.max_iters=15")
    metrics = train(cfg, tmp_path / "run")
    data, tok, _ = load_corpus(cfg.data, cfg.tokenizer, cfg.model.seq_len)
    val_text = tok.decode(data.val.tolist())
    assert tiny_text_file.read_text().endswith(val_text)
    expected = metrics["final_val_loss"] / math.log(2) * len(data.val) / len(val_text.encode("utf-8"))
    assert metrics["val_bpb"] == pytest.approx(expected, rel=1e-9)
    best = metrics["best_val_loss"] / math.log(2) * len(data.val) / len(val_text.encode("utf-8"))
    assert metrics["best_val_bpb"] == pytest.approx(best, rel=1e-9)
    assert metrics["vocab_size"] == tok.vocab_size and (kind == "char" or tok.vocab_size <= 300)
    if kind == "bpe":  # several bytes per token: bpb is well below loss / ln 2
        assert metrics["val_bpb"] < 0.6 * metrics["final_val_loss"] / math.log(2)


def test_run_log_counts_files_and_bytes(tree, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        load_corpus(corpus_cfg(tmp_path, tree, val_fraction=0.5), TokenizerConfig(), 4)
    n_bytes = sum(p.stat().st_size for p in resolve_sources(str(tree)).files)
    assert any(
        f"5 file(s), {n_bytes:,} bytes (1 binary and 1 empty file(s) skipped)" in r.message for r in caplog.records
    )


def test_iter_text_streams_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_mod, "READ_BLOCK", 1000)
    path = write(tmp_path / "a.txt", make_text(10_000))
    pieces = list(iter_text(resolve_sources(str(path))))
    assert len(pieces) == 10 and max(len(p) for p in pieces) <= 1000


@pytest.mark.parametrize(
    ("given", "joined"),
    [("\\n\\n", "\n\n"), ("\\t--\\r\\n", "\t--\r\n"), ("\\\\n", "\\n"), ("\n", "\n"), ("<sep>", "<sep>")],
)
def test_the_separator_reads_backslash_escapes_as_the_command_line_can_give_no_newline(tmp_path, given, joined):
    write(tmp_path / "t" / "a.txt", "first file " * 20)
    write(tmp_path / "t" / "b.txt", "second file " * 20)
    text = "first file " * 20 + joined + "second file " * 20
    for cfg in (
        corpus_cfg(tmp_path, tmp_path / "t", separator=given, val_fraction=0.5),
        compose_config(
            [f"data.path={tmp_path / 't'}", f"data.cache_dir={tmp_path / 'cache'}", f"data.separator='{given}'"]
        ).data,
    ):
        data, tok, _ = load_corpus(cfg, TokenizerConfig(), 4)
        assert tok.decode(np.concatenate([data.train, data.val]).tolist()) == text


def test_a_normalizing_tokenizer_validates_on_the_same_text_counted_as_read(tmp_path):
    """A tokenizer that strips accents stands for fewer bytes than the text has: the split and the bytes behind
    val/bpb are measured on the text as read, as for every other tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents()])
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(
        [make_text(3_000)], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    hf.save(str(tmp_path / "strip.json"))
    text = make_text(4_000) + "\n" + "résumé naïve élève café déjà " * 60
    path = write(tmp_path / "a.txt", text)
    cfg = corpus_cfg(tmp_path, path, val_fraction=0.3)
    char, _, _ = load_corpus(cfg, TokenizerConfig(), 16)
    stripping, _, _ = load_corpus(cfg, TokenizerConfig(kind="bpe", path=str(tmp_path / "strip.json")), 16)
    n_bytes = len(text.encode("utf-8"))
    assert char.val_bytes == stripping.val_bytes == int(n_bytes * 0.3)  # the last 30% of the text, as read


def test_a_separator_character_the_tokenizer_lacks_is_named_as_the_separators(tmp_path):
    write(tmp_path / "t" / "1.txt", "abcabcabcabcabcabc" * 3)
    write(tmp_path / "t" / "2.txt", "cbacbacbacbacba" * 3)
    CharTokenizer(list("abc")).save(tmp_path / "abc.json")
    tok_cfg = TokenizerConfig(path=str(tmp_path / "abc.json"))
    with pytest.raises(FluxtrainError) as info:
        load_corpus(corpus_cfg(tmp_path, tmp_path / "t"), tok_cfg, 2)
    assert str(info.value) == (
        "data.separator='\\n', put between files: 1 character(s) not in the tokenizer's vocabulary: '\\n' (the "
        "tokenizer comes from tokenizer.path)"
    )
    data, _, _ = load_corpus(corpus_cfg(tmp_path, tmp_path / "t", separator="c"), tok_cfg, 2)  # one it has
    assert len(data.train) + len(data.val) == 18 * 3 + 1 + 15 * 3


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_cache_file_that_cannot_be_written_names_data_cache_dir_and_the_ways_out(tmp_path, monkeypatch, kind):
    from fluxtrain.files import WriteError

    text = tmp_path / "a.txt"
    text.write_text(make_text(5_000))

    def full_disk(path, *args):
        raise WriteError(Path(path), OSError(27, "File too large"))

    monkeypatch.setattr(data_mod, "atomic_write" if kind == "char" else "atomic_write_text", full_disk)
    cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FluxtrainError) as info:
        load_corpus(cfg, TokenizerConfig(kind=kind, vocab_size=300), 16)
    entry = "tokens/" if kind == "char" else "tokenizers/"
    assert str(info.value).startswith(f"data.cache_dir={tmp_path / 'cache'}: cannot write {tmp_path / 'cache' / entry}")
    assert str(info.value).endswith(": File too large; give data.cache_dir a folder with room, or set data.cache=false")


def test_an_encode_killed_while_writing_leaves_a_temporary_that_a_later_one_removes(tmp_path):
    """Only those untouched for an hour: the cache is shared, and another run may be writing one right now."""
    text = tmp_path / "a.txt"
    text.write_text(make_text(5_000))
    tokens = tmp_path / "cache" / "tokens"
    tokens.mkdir(parents=True)
    dead, live, other = (
        tokens / ".0123abcd.bin.5e1f00aa12bc.tmp",
        tokens / ".89ef.bin.0a0b0c0d0e0f.tmp",
        tokens / "x.tmp",
    )
    for path in (dead, live, other):
        path.write_bytes(b"\0" * 100)
    os.utime(dead, (time.time() - 2 * 3600,) * 2)
    os.utime(other, (time.time() - 2 * 3600,) * 2)
    load_corpus(DataConfig(path=str(text), cache_dir=str(tmp_path / "cache")), TokenizerConfig(), 16)
    assert not dead.exists() and live.exists() and other.exists()


def test_a_download_that_cannot_be_written_names_data_cache_dir_and_the_ways_out(tmp_path, monkeypatch):
    def full_disk(url, dest, sha256):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_mod, "download", full_disk)
    cfg = DataConfig(path=None, url="http://127.0.0.1:9/x.txt", sha256=None, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FluxtrainError) as info:
        data_mod.resolve_text_path(cfg)
    assert str(info.value) == (
        f"data.cache_dir={tmp_path / 'cache'}: cannot write the download of data.url into {tmp_path / 'cache'}: "
        "No space left on device; give data.cache_dir a folder with room, or download the file by hand and set "
        "data.path"
    )
