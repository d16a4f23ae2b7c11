"""Atomic writes: a failed write leaves the old file and no temporary file behind; the writability check's messages."""

import errno
import os
from pathlib import Path

import pytest

import fluxtrain.files
from fluxtrain.errors import FluxtrainError
from fluxtrain.files import atomic_write, atomic_write_text, check_writable


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    atomic_write_text(tmp_path / "new" / "file.txt", "é\n")  # the folder is created; text is UTF-8
    assert (tmp_path / "new" / "file.txt").read_bytes() == "é\n".encode()


def test_an_os_error_from_a_library_written_in_rust_is_a_one_line_write_error(tmp_path, monkeypatch):
    """tokenizers (and safetensors) raise a plain Exception for a full disk: "... (os error 28)"."""
    from fluxtrain.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.train("to be or not to be " * 50, 300)

    def full_disk(path):
        Path(path).write_text("half")
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(tokenizer.hf, "save", full_disk)
    with pytest.raises(fluxtrain.files.WriteError) as info:
        tokenizer.save(tmp_path / "tokenizer.json")
    assert str(info.value) == f"cannot write {tmp_path / 'tokenizer.json'}: No space left on device"
    assert list(tmp_path.iterdir()) == []

    def fails(path):
        raise ValueError("not about the disk")

    with pytest.raises(ValueError, match="not about the disk"):  # anything else passes as it is
        atomic_write(tmp_path / "x", fails)


def test_check_writable_says_which_folder_refused_a_file_and_why(tmp_path, monkeypatch):
    def message(path, folder=True) -> str:
        with pytest.raises(FluxtrainError) as e:
            check_writable(path, "data.cache_dir", folder=folder)
        return str(e.value)

    (tmp_path / "a_file").write_text("x")
    assert message(tmp_path / "a_file") == f"data.cache_dir={tmp_path / 'a_file'} is a file, not a folder"
    assert message(tmp_path, folder=False) == f"data.cache_dir={tmp_path} is a folder, not a file"
    assert message(tmp_path / "a_file" / "sub") == (
        f"data.cache_dir={tmp_path / 'a_file' / 'sub'} cannot be written: {tmp_path / 'a_file'} is a file, not a folder"
    )
    if Path("/proc").is_dir():  # /proc exists, but refuses a new file with "No such file or directory"
        assert message("/proc/nope") == (
            "data.cache_dir=/proc/nope cannot be written: cannot create a file in /proc (No such file or directory)"
        )

    check_writable(tmp_path / "new" / "cache", "data.cache_dir", folder=True)  # a folder yet to be made: fine

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fluxtrain.files.tempfile, "TemporaryFile", read_only)
    assert message(tmp_path / "new" / "cache") == (
        f"data.cache_dir={tmp_path / 'new' / 'cache'} cannot be written: cannot create a file in {tmp_path} "
        "(Read-only file system)"
    )
