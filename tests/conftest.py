"""Shared fixtures: config composition through Hydra's compose API, tiny corpora and tiny training configs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fluxtrain.config import config_dir, register_configs
from fluxtrain.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# A tiny model and run that trains in a second or two on CPU.
TINY_OVERRIDES = [
    "model.d_model=32",
    "model.n_heads=2",
    "model.n_layers=2",
    "model.ff_dim=64",
    "model.seq_len=16",
    "train.max_iters=30",
    "train.batch_size=8",
    "train.log_interval=10",
    "train.eval_interval=15",
    "train.eval_iters=4",
    "train.sample_interval=0",
    "train.ckpt_interval=0",
    "train.device=cpu",
    "optim.warmup_iters=5",
    "optim.lr=3e-3",
]

register_configs()


def tiny_except(*keys: str) -> list[str]:
    """TINY_OVERRIDES without the settings `keys`, to sweep or set them once on the command line."""
    return [o for o in TINY_OVERRIDES if o.split("=", 1)[0] not in keys]


def compose_config(overrides: list[str] | None = None, return_hydra_config: bool = False) -> DictConfig:
    """The composed config for `overrides`, exactly as the command line would build it."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)


def make_text(n_chars: int = 20_000, seed: int = 0) -> str:
    """Shakespeare-shaped generated text: speaker names in capitals, colons and short lines."""
    rng = random.Random(seed)
    words = "the king my lord good sir love death night sweet heart come go speak hear thou art what why".split()
    names = ["ROMEO", "JULIET", "HAMLET", "KING", "NURSE"]
    out: list[str] = []
    size = 0
    while size < n_chars:
        line = f"{rng.choice(names)}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + ".\n\n"
        out.append(line)
        size += len(line)
    return "".join(out)[:n_chars]


@pytest.fixture
def one_thread():
    """Decoding tiny models is per-op overhead; extra threads only wait on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_text_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture
def tiny_cfg(tiny_text_file: Path, tmp_path: Path):
    """Compose a tiny training config on the generated corpus, caching into tmp_path; extra overrides win."""

    def make(*overrides: str) -> DictConfig:
        cache = f"data.cache_dir={tmp_path / 'cache'}"
        return compose_config([*TINY_OVERRIDES, f"data.path={tiny_text_file}", cache, *overrides])

    return make


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE


def param_count_formula(cfg: ModelConfig, vocab_size: int) -> int:
    """Closed-form parameter count of `GPT(cfg, vocab_size)` for the default (learned, layernorm, gelu, bias) blocks."""
    d, f = cfg.d_model, cfg.ff_dim
    embeddings = vocab_size * d + cfg.seq_len * d
    attention = d * 3 * d + 3 * d + d * d + d
    mlp = d * f + f + f * d + d
    norms = 2 * (2 * d)
    return embeddings + cfg.n_layers * (attention + mlp + norms) + 2 * d


def run_fluxtrain(*args: str, entry: tuple[str, ...] = ("-m", "fluxtrain"), timeout: float = 900):
    """`python -m fluxtrain ARGS` (or another `entry`) run at the repository root, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, *entry, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def poison_training_loss(monkeypatch, call: int, factor: float) -> None:
    """Multiply the loss of the `call`-th training forward pass (counted from 1) by `factor`, e.g. inf or nan."""
    from fluxtrain.model import GPT

    real_forward = GPT.forward
    calls = 0

    def forward(self, idx, targets=None, cache=None):
        nonlocal calls
        logits, loss = real_forward(self, idx, targets, cache)
        if self.training and targets is not None:
            calls += 1
            if calls == call:
                loss = loss * factor
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


@pytest.fixture
def full_disk_after_20_events(monkeypatch) -> list:
    """TensorBoard's record writer fails with ENOSPC after 20 records, as on a full disk, in its writer thread.
    Returns what that thread's error would have printed (as a traceback): nothing, where it is left out."""
    import errno
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    real_write, written = RecordWriter.write, []

    def write(self, data):
        written.append(len(data))
        if len(written) > 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)
    printed: list = []
    monkeypatch.setattr(threading, "excepthook", printed.append)
    return printed


@pytest.fixture
def decoded_models(monkeypatch) -> list:
    """The models the generate command decodes with, as it passes them to `sample_stream` (one per prompt)."""
    import fluxtrain.generate as generate_module

    models = []
    real = generate_module.sample_stream

    def recording(model, *args, **kwargs):
        models.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(generate_module, "sample_stream", recording)
    return models


def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """Step -> value of one scalar from the single TensorBoard events file in `run_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(Path(run_dir).glob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}
