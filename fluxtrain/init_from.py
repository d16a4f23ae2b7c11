"""`init_from`: a fresh run that starts from the weights and tokenizer of a model file, to fine-tune it."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from fluxtrain.checkpoint import Checkpoint
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import ModelConfig
from fluxtrain.model_file import checked_metadata, read_model_file
from fluxtrain.resume import MODEL_KEYS_FREE_ON_RESUME, setting_differences
from fluxtrain.runs import resolve_model_path
from fluxtrain.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_json

log = logging.getLogger("fluxtrain")


@dataclass
class StartWeights:
    path: Path  # the model file or checkpoint they come from
    tokenizer: Tokenizer  # the model's own: the run encodes its data with it
    state: dict[str, torch.Tensor]


def load_start_weights(cfg: DictConfig, model_cfg: ModelConfig, resuming: bool) -> StartWeights | None:
    """The weights and tokenizer `init_from` names (a model file, a checkpoint or a run folder), checked against the
    run's model settings, which must describe the same shape; None without `init_from`, or when the run resumes from
    a checkpoint of its own, which holds the weights it reached since."""
    name = cfg.get("init_from")
    if name is None:
        return None
    if resuming:
        log.info(f"init_from={name} is not used: the run continues from its checkpoint")
        return None
    path = resolve_model_path(name, "init_from")
    source = f"init_from={path}"
    try:
        meta, state = read_model_file(path)
    except FluxtrainError as e:
        raise FluxtrainError(f"{source}: {e}") from None
    saved, tokenizer = checked_metadata(meta, source, state)
    differ = setting_differences(asdict(saved), asdict(model_cfg), "model", MODEL_KEYS_FREE_ON_RESUME, "model file")
    if differ:
        raise FluxtrainError(
            f"{source}: the model settings describe another model: {'; '.join(differ)} (give the model file's "
            "settings, e.g. the preset it was trained with; model.dropout may change)"
        )
    if cfg.tokenizer.path and load_tokenizer(cfg.tokenizer.path).to_json() != tokenizer.to_json():
        raise FluxtrainError(
            f"{source}: tokenizer.path={cfg.tokenizer.path} is not the model file's tokenizer, which the run must "
            "keep (leave tokenizer.path out: the run takes the model file's)"
        )
    if not cfg.tokenizer.path and cfg.tokenizer.kind != tokenizer.kind:
        log.warning(
            f"{source} holds a {tokenizer.name} tokenizer, which the run keeps: tokenizer={cfg.tokenizer.kind} is not "
            f"used (give tokenizer={tokenizer.kind} to say so)"
        )
    log.info(f"init_from: the run starts from the weights of {path} (and its {tokenizer.name} tokenizer)")
    return StartWeights(path, tokenizer, state)


def kept_tokenizer(cfg: DictConfig, start: StartWeights | None, resume: Checkpoint | None) -> Tokenizer | None:
    """The tokenizer a run started with `init_from` encodes its text with, the model file's: from the file, or once
    the run resumes, from the checkpoint of a run that started so. None for a run that builds its tokenizer as
    `tokenizer.*` says (a resumed one is checked against its checkpoint's)."""
    if start is not None:
        return start.tokenizer
    if resume is None or resume.config.get("init_from") is None:
        return None
    tokenizer = tokenizer_from_json(resume.tokenizer_json)
    if cfg.tokenizer.path and load_tokenizer(cfg.tokenizer.path).to_json() != tokenizer.to_json():
        raise FluxtrainError(
            f"cannot resume from {resume.path}: tokenizer.path={cfg.tokenizer.path} is not the tokenizer the run "
            "fine-tunes with, its model file's (leave tokenizer.path out)"
        )
    return tokenizer
