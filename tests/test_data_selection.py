"""Which files a folder or glob corpus reads: empty settings, symbolic links (followed, loops cut, each file once)
and fluxtrain's own output (the run folder, other run folders, data.cache_dir) left out."""

import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxtrain.data import DataConfig, TokenData, corpus_sources, load_corpus, validate
from fluxtrain.errors import FluxtrainError
from fluxtrain.sources import resolve_sources
from fluxtrain.train import train

from .conftest import compose_config, make_text


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def time_limit(seconds: int):
    """Fail, rather than hang, when a glob loops for ever."""

    def too_long(*_):
        pytest.fail(f"did not end within {seconds} s")  # not an OSError, which glob would swallow

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("data.cache_dir", "data.cache_dir='' is empty; give a folder (default ~/.cache/fluxtrain)"),
        ("data.url", "data.url='' is empty; give the URL of a text file, or a data.path"),
        ("data.url='http://[::1'", "data.url='http://[::1' is not a valid URL (Invalid IPv6 URL)"),
    ],
)
def test_an_empty_cache_folder_or_url_is_an_error_not_the_working_folder(tmp_path, monkeypatch, setting, message):
    monkeypatch.chdir(tmp_path)
    cfg = compose_config([setting if "=" in setting else f"{setting}="])  # "=": as from an unset shell variable
    with pytest.raises(FluxtrainError) as info:
        load_corpus(cfg.data, cfg.tokenizer, 16)
    assert str(info.value) == message
    assert not list(tmp_path.iterdir())  # nothing cached or downloaded into the working folder


def names(sources, root: Path) -> list[str]:
    return [os.path.relpath(p, root) for p in sources.files]


@pytest.mark.parametrize("setting", ["path", "val_path"])
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_path_is_an_error_not_the_default_corpus(tmp_path, setting, value):
    with pytest.raises(FluxtrainError, match=rf"^data\.{setting}='{value}' is empty; give a file, folder or glob"):
        validate(DataConfig(**{setting: value}, cache_dir=str(tmp_path)))
    cfg = compose_config([f"data.{setting}=", f"data.cache_dir={tmp_path}"])  # as from an unset shell variable
    with pytest.raises(FluxtrainError, match=rf"^data\.{setting}='' is empty"):
        load_corpus(cfg.data, cfg.tokenizer, 16)
    assert not list(tmp_path.iterdir())  # nothing downloaded


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """A folder with a file, a link to that file, a link to a folder outside it and a link loop."""
    root = tmp_path / "corpus"
    write(root / "real" / "a.txt", "alpha\n")
    write(tmp_path / "outside" / "b.txt", "beta\n")
    write(root / "loop" / "c.txt", "gamma\n")
    (root / "alias.txt").symlink_to(root / "real" / "a.txt")
    (root / "more").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "loop" / "self").symlink_to(root / "loop", target_is_directory=True)
    (root / "loop" / "up").symlink_to(root, target_is_directory=True)
    return root


@pytest.mark.parametrize("form", ["{root}", "{root}/**/*.txt", "{root}/**"])
def test_links_are_followed_loops_cut_and_each_file_read_once(linked, form):
    with time_limit(10):
        sources = resolve_sources(form.format(root=linked))
    # Each real file once, under its first name in sorted order; the linked folder is read.
    assert names(sources, linked) == ["alias.txt", "loop/c.txt", "more/b.txt"]
    assert sources.n_duplicates == 1 and sources.n_loops == 2
    assert "1 duplicate(s) of a file already read skipped; 2 link loop(s) not followed" in sources.describe()


def test_a_glob_through_many_loops_ends(tmp_path):
    root = tmp_path / "loops"
    write(root / "x.txt", "x\n")
    for name in "abcdefgh":  # glob.glob would try 8 ** 40 paths here
        (root / name).symlink_to(root, target_is_directory=True)

    with time_limit(10):
        sources = resolve_sources(f"{root}/**/*.txt")
    assert names(sources, root) == ["x.txt"] and sources.n_loops == 8


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project holding text, fluxtrain run folders, this run's folder and the cache."""
    root = tmp_path / "project"
    write(root / "notes.txt", make_text(4_000))
    write(root / "outputs" / "old" / "train.log", "iter 1 | loss 3.0\n")
    write(root / "outputs" / "old" / ".hydra" / "config.yaml", "model: small\n")
    write(root / "outputs" / "ckpt" / "metrics.json", "{}\n")
    write(root / "outputs" / "ckpt" / "checkpoints" / "iter_000005.ckpt", "x")
    write(root / "outputs" / "sweep" / "multirun.yaml", "a: 1\n")
    write(root / "outputs" / "now" / "train.log", "being written\n")
    write(root / "cache" / "tokens" / "abc.json", "{}\n")
    write(root / "src" / "checkpoints" / "notes.txt", "a folder called checkpoints is not a run\n")
    return root


@pytest.mark.parametrize("form", ["{root}", "{root}/**/*.*"])
def test_fluxtrain_output_is_left_out_of_a_folder_or_glob(project, form):
    cfg = DataConfig(path=form.format(root=project), cache_dir=str(project / "cache"))
    train_src, _ = corpus_sources(cfg, run_dir=project / "outputs" / "now")
    assert names(train_src, project) == ["notes.txt", "src/checkpoints/notes.txt"]
    assert train_src.left_out == {"data.cache_dir": 1, "fluxtrain run folders": 4, "this run's folder": 1}
    assert "1 file(s) in data.cache_dir left out; 4 file(s) in fluxtrain run folders left out" in train_src.describe()
    # A folder that is named is read, run folder or not.
    old, _ = corpus_sources(DataConfig(path=str(project / "outputs" / "old"), cache_dir=str(project / "cache")))
    assert names(old, project) == ["outputs/old/train.log"]
    # Only output: the error says so.
    with pytest.raises(FluxtrainError, match=r"only 4 file\(s\) in fluxtrain run folders, 1 file\(s\) in this run"):
        corpus_sources(
            DataConfig(path=str(project / "outputs"), cache_dir=str(project / "cache")), project / "outputs" / "now"
        )


def test_a_link_into_the_cache_is_left_out(tmp_path):
    write(tmp_path / "cache" / "tinyshakespeare.txt", "downloaded\n")
    write(tmp_path / "corpus" / "a.txt", "mine\n")
    (tmp_path / "corpus" / "cached").symlink_to(tmp_path / "cache", target_is_directory=True)
    (tmp_path / "corpus" / "shakespeare.txt").symlink_to(tmp_path / "cache" / "tinyshakespeare.txt")
    train_src, _ = corpus_sources(DataConfig(path=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache")))
    assert names(train_src, tmp_path / "corpus") == ["a.txt"] and train_src.left_out == {"data.cache_dir": 2}


def test_training_on_the_project_folder_never_reads_its_own_output(project, tmp_path, caplog):
    overrides = [
        "model=small",
        "model.n_layers=1",
        "model.d_model=16",
        "model.n_heads=2",
        "model.seq_len=16",
        "train.max_iters=2",
        "train.eval_iters=1",
        "train.batch_size=2",
        "train.device=cpu",
        f"data.path={project}",
        f"data.cache_dir={project / 'cache'}",
        "data.val_fraction=0.5",
    ]
    with caplog.at_level(logging.INFO, logger="fluxtrain"):
        train(compose_config(overrides), project / "outputs" / "now")
        run1 = sorted(p.name for p in (project / "outputs" / "now").rglob("*") if p.is_file())
        n_cached = sum(p.is_file() for p in (project / "cache").rglob("*"))
        caplog.clear()
        write(project / "outputs" / "run2" / "train.log", "as Hydra's log handler writes it\n")
        train(compose_config(overrides), project / "outputs" / "run2")
    assert "iter_000002.ckpt" in run1 and "tokenizer.json" in run1
    (line,) = [r.message for r in caplog.records if r.message.startswith(f"data: data.path={project}:")]
    # The first run's output (tokenizer.json, metrics.json, ...) is a run folder's now; the second run's log is its own.
    n_run_files = 4 + len(run1)
    assert line.endswith(
        f": 2 file(s), {sum(p.stat().st_size for p in project.glob('**/notes.txt')):,} bytes ({n_cached} file(s) in "
        f"data.cache_dir left out; {n_run_files} file(s) in fluxtrain run folders left out; 1 file(s) in this run's "
        "folder left out)"
    ), line


def test_include_and_exclude_with_only_single_files_are_said_to_be_ignored(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "b.txt").write_text("more text\n")
    (tmp_path / "val" / "c.md").write_text("notes\n")
    single = DataConfig(path=str(tmp_path / "a.txt"), include=["*.md"], cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        train_sources, _ = corpus_sources(single)
    assert train_sources.files == [tmp_path / "a.txt"]
    assert "data.include and data.exclude choose files in a folder or glob" in caplog.text
    caplog.clear()
    with_folder = DataConfig(path=str(tmp_path / "a.txt"), val_path=str(tmp_path / "val"), include=["*.md"])
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        _, val_sources = corpus_sources(with_folder)
    assert val_sources.files == [tmp_path / "val" / "c.md"]  # the filter did apply, to the folder
    assert "choose files in a folder or glob" not in caplog.text


def test_batches_of_no_positive_integer_size_or_of_another_split_are_named():
    data = TokenData(np.arange(100), np.arange(100, 140), 8, "test", 40)
    for batch_size in (-1, 0, 2.5, "4", True, None):
        with pytest.raises(FluxtrainError, match=r"^batch_size=.* must be a positive integer$"):
            data.get_batch("train", batch_size, torch.Generator().manual_seed(0))
    with pytest.raises(FluxtrainError, match=r"^split 'bogus' is not 'train' or 'val'$"):
        data.get_batch("bogus", 2, torch.Generator().manual_seed(0))
    x, y = data.get_batch("val", 3, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1]) and x.min() >= 100
    assert data.get_batch("train", np.int64(3), torch.Generator().manual_seed(0))[0].shape == (3, 8)  # numpy's too
