"""Model files: safetensors weights with the model config and tokenizer in the metadata, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.tokenizer import Tokenizer, tokenizer_from_json

MODEL_FORMAT = "fluxtrain-model"
FORMAT_VERSION = "1"
TIED_KEYS = ("head.weight",)  # tied to tok_emb.weight, so stored once


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file in the same folder, fsync it, then rename it over `path`.

    A crash at any moment leaves either the old file or the complete new one, never a partial file at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile (`_orig_mod`) and DDP/FSDP (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the unwrapped model, without the tied head, as contiguous CPU tensors."""
    state = unwrap(model).state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in TIED_KEYS}


def model_metadata(model: GPT, tokenizer: Tokenizer, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": json.dumps(asdict(model.cfg)),
        "vocab_size": str(model.vocab_size),
        "tokenizer": tokenizer.to_json(),
    }
    meta.update(extra or {})
    return meta


def save_model_file(path: str | Path, model: nn.Module, tokenizer: Tokenizer, extra: dict[str, str] | None = None):
    """Write a self-describing model file: weights plus model config and tokenizer in the metadata."""
    plain = unwrap(model)
    state = model_state(plain)
    meta = model_metadata(plain, tokenizer, extra)
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def model_config_from_json(text: str, source: str) -> ModelConfig:
    data = json.loads(text)
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(data) - known
    if unknown:
        raise FluxtrainError(f"{source}: model config has unknown keys {sorted(unknown)}")
    return ModelConfig(**data)


def read_model_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a model file, with one-line errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FluxtrainError(f"model file {path} does not exist")
    if path.stat().st_size == 0:
        raise FluxtrainError(f"model file {path} is empty")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != MODEL_FORMAT:
                raise FluxtrainError(f"{path} is not a fluxtrain model file (no '{MODEL_FORMAT}' metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, FluxtrainError):
            raise
        raise FluxtrainError(f"{path} is not a readable safetensors model file: {str(e).splitlines()[0]}") from None
    return meta, tensors


def build_from_metadata(meta: dict[str, str], source: str) -> tuple[GPT, Tokenizer]:
    try:
        cfg = model_config_from_json(meta["model_config"], source)
        tokenizer = tokenizer_from_json(meta["tokenizer"])
        vocab_size = int(meta["vocab_size"])
    except (KeyError, ValueError, TypeError) as e:
        if isinstance(e, FluxtrainError):
            raise
        raise FluxtrainError(f"{source}: damaged model metadata ({type(e).__name__}: {e})") from None
    return GPT(cfg, vocab_size), tokenizer


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, with an error naming the file when they do not fit the model."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in TIED_KEYS}
    got = {k: v.shape for k, v in state.items()}
    if expected.keys() != got.keys():
        missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise FluxtrainError(
            f"{source}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    wrong = [k for k in expected if tuple(expected[k]) != tuple(got[k])]
    if wrong:
        k = wrong[0]
        raise FluxtrainError(f"{source}: weight {k} has shape {tuple(got[k])}, the model needs {tuple(expected[k])}")
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Rebuild a model and its tokenizer from one model file; the model is in eval mode on `device`."""
    meta, state = read_model_file(path)
    model, tokenizer = build_from_metadata(meta, str(path))
    load_state_into(model, state, str(path))
    return model.to(device).eval(), tokenizer
