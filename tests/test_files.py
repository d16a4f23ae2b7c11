"""Atomic writes: a failed write leaves the old file and no temporary file behind."""

import pytest

from fluxtrain.files import atomic_write, atomic_write_text


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
