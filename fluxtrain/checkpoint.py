"""Full training checkpoints (`iter_XXXXXX.ckpt`): a model file's weights, config and tokenizer plus everything the
loop needs to continue exactly: optimizer and grad-scaler state, RNG states, progress and the run's config."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from fluxtrain import distributed
from fluxtrain.distributed import full_optimizer_state, load_full_weights, model_device, shard_optimizer_state
from fluxtrain.errors import FluxtrainError, first_line
from fluxtrain.files import atomic_write, parse_json
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.model_file import (
    CHECKPOINT_FORMAT,
    DIGEST_KEY,
    WEIGHT_DTYPES,
    check_dtypes,
    check_full_precision,
    check_weights,
    content_digest,
    first_non_finite,
    is_sharded,
    is_writer,
    json_fields,
    load_state_into,
    model_config_from_json,
    model_metadata,
    model_state,
    read_safetensors,
    unwrap,
)
from fluxtrain.tokenizer import Tokenizer, tokenizer_from_json


@dataclass
class Progress:
    """Where the loop stands, besides model, optimizer and RNGs: enough to continue as if it had never stopped."""

    iteration: int = 0
    best_val_loss: float = math.inf
    train_time: float = 0.0  # seconds of the training loop so far: the spent part of train.max_time
    warmup_done_at: float | None = None  # train_time when the warm-up ended (the time-budget schedule needs it)
    window_losses: list[float] = field(default_factory=list)  # losses since the last logged iteration
    wall_time: float = 0.0  # seconds of the sessions so far, each from its start to its last checkpoint
    # The last evaluation, logged before this checkpoint: a run resumed with nothing left to do reports it as it is.
    eval_at: int | None = None
    eval_val_loss: float | None = None
    eval_train_loss: float | None = None  # None with train.eval_train=false
    time_ran_out: bool = False  # the loop ended because train.max_time ran out: a resume has none left to train

    def last_evaluation(self) -> dict[str, float]:
        """The losses of the evaluation at `eval_at` by split ("val", and "train" when it was measured); {} if none."""
        if self.eval_at is None or self.eval_val_loss is None:
            return {}
        losses = {"val": self.eval_val_loss}
        return losses if self.eval_train_loss is None else {**losses, "train": self.eval_train_loss}


@dataclass
class Checkpoint:
    """A loaded checkpoint: plain tensors and dicts, checked, not yet applied to a model."""

    path: Path
    model_config: ModelConfig
    vocab_size: int
    tokenizer_json: str
    config: dict[str, Any]  # the composed config of the run that wrote it
    progress: Progress
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    scaler: dict[str, Any]
    rng: dict[str, torch.Tensor]


RUN_CONFIG_SECTIONS = ("model", "data", "tokenizer", "optim", "train")  # compared with the resuming run's


def checked_progress(data: Any, source: str) -> Progress:
    """The progress a checkpoint records, every value of its type and in its range (a count from 0, seconds from 0,
    losses finite; the best validation loss may be infinite, before the first evaluation)."""
    fields = json_fields(data, Progress, "progress", source)
    if "iteration" not in fields:
        raise FluxtrainError(f"{source}: its progress has no iteration")
    progress = Progress(**fields)
    times = {"train_time": progress.train_time, "wall_time": progress.wall_time}
    losses = [v for v in (progress.eval_val_loss, progress.eval_train_loss) if v is not None]
    if progress.warmup_done_at is not None:
        times["warmup_done_at"] = progress.warmup_done_at
    problems = [
        (progress.iteration < 0, f"iteration={progress.iteration} is negative"),
        *((not 0 <= value < math.inf, f"{key}={value} is not a number of seconds") for key, value in times.items()),
        (not 0 <= progress.best_val_loss, f"best_val_loss={progress.best_val_loss} is not a loss"),
        (not all(math.isfinite(v) for v in progress.window_losses), "window_losses holds NaN or infinite values"),
        (not all(math.isfinite(v) for v in losses), "its last evaluation's losses are NaN or infinite"),
        (progress.eval_at is not None and progress.eval_at < 0, f"eval_at={progress.eval_at} is negative"),
    ]
    problem = next((text for wrong, text in problems if wrong), None)
    if problem is not None:
        raise FluxtrainError(f"{source}: its progress is damaged: {problem}")
    return progress


class NonFiniteWeightsError(FluxtrainError):
    """The weights hold NaN or infinite values; such a model is never written to a checkpoint."""


def rng_state(batch_gen: torch.Generator, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every generator that shapes training: torch CPU, the training GPU's (dropout there), the batch sampler.

    The batch sampler is the same on every rank; torch's generators are each rank's own (dropout masks differ
    between ranks). Rank 0's are `torch` and `cuda`, rank r's `rank<r>/torch` and `rank<r>/cuda`; under torchrun
    every rank calls this (it gathers them).
    """
    own = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    state = {"batches": batch_gen.get_state()}
    for name, value in own.items():
        for rank, rank_value in enumerate(distributed.gather_from_ranks(value)):
            state[name if rank == 0 else f"rank{rank}/{name}"] = rank_value
    return state


def takes_state(state: torch.Tensor) -> bool:
    """Whether a CPU generator takes `state` (torch checks its Mersenne Twister state as it sets it)."""
    try:
        torch.Generator().set_state(state)
    except RuntimeError:
        return False
    return True


def set_rng_state(rng: dict[str, torch.Tensor], batch_gen: torch.Generator, device: torch.device) -> None:
    """Put the saved states back: the batch sampler's, and this rank's torch generators (a rank the saving run did
    not have keeps those it was seeded with)."""
    batch_gen.set_state(rng["batches"])
    rank = distributed.current_world().rank
    prefix = f"rank{rank}/" if rank > 0 else ""
    if (cpu_state := rng.get(f"{prefix}torch")) is not None:
        torch.set_rng_state(cpu_state)
    if device.type != "cuda":
        return
    # Older checkpoints hold every GPU's state as the saving process saw them ("cuda/<index>"): this GPU's, as before.
    index = torch.cuda.current_device() if device.index is None else device.index
    cuda_state = rng.get(f"{prefix}cuda", rng.get(f"cuda/{index}"))
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a torch optimizer state_dict as `optim/<param>/<name>`, everything else as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        rest[str(index)] = {}
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                rest[str(index)][name] = value
    return tensors, json.dumps({"state": rest, "param_groups": state["param_groups"]})


def _join_optimizer_state(tensors: dict[str, torch.Tensor], text: str) -> dict[str, Any]:
    data = parse_json(text)
    state = {int(index): dict(values) for index, values in data["state"].items()}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": data["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rng: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    config: dict[str, Any],
    progress: Progress,
) -> None:
    """Write a full checkpoint atomically; refuses (NonFiniteWeightsError) when the weights are not finite."""
    plain = unwrap(model)
    check_full_precision(plain, path)
    if not (is_writer() or is_sharded(plain)):  # FSDP gathers weights and optimizer state with every rank
        return
    weights = model_state(plain)
    bad = first_non_finite(weights)
    if bad is not None:
        raise NonFiniteWeightsError(f"weight {bad} holds NaN or infinite values; {Path(path).name} was not written")
    optim_state = full_optimizer_state(optimizer)  # all ranks: FSDP gathers the shards
    if not is_writer():
        return
    tensors = {f"model/{k}": v for k, v in weights.items()}
    optim_tensors, optim_json = _split_optimizer_state(optim_state)
    tensors.update(optim_tensors)
    tensors.update({f"rng/{k}": v.detach().cpu().contiguous() for k, v in rng.items()})
    meta = model_metadata(
        plain,
        tokenizer,
        {
            "format": CHECKPOINT_FORMAT,
            "progress": json.dumps(asdict(progress)),
            "optimizer": optim_json,
            "scaler": json.dumps(scaler.state_dict()),
            "config": json.dumps(config),
        },
    )
    meta[DIGEST_KEY] = content_digest(tensors, meta)
    atomic_write(path, lambda tmp: tmp.write_bytes(safetensors_bytes(tensors, metadata=meta)))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint file; every problem is a one-line FluxtrainError naming the file."""
    path = Path(path)
    meta, tensors = read_safetensors(path, "checkpoint")
    if meta["format"] != CHECKPOINT_FORMAT:
        raise FluxtrainError(f"{path} is a model file, not a training checkpoint: it has no optimizer or RNG state")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix not in groups:
            raise FluxtrainError(f"{path}: unexpected tensor {key!r} in a checkpoint")
        groups[prefix][name] = value
    try:
        model_config = model_config_from_json(meta["model_config"], str(path))
        vocab_size = int(meta["vocab_size"])
        tokenizer_from_json(meta["tokenizer"])
        progress = checked_progress(parse_json(meta["progress"]), str(path))
        optimizer = _join_optimizer_state(groups["optim"], meta["optimizer"])
        scaler = parse_json(meta["scaler"])
        if not isinstance(scaler, dict):
            raise FluxtrainError(f"{path}: its grad-scaler state is not a JSON object")
        config = parse_json(meta["config"])
        if not isinstance(config, dict):
            raise FluxtrainError(f"{path}: its run config is not a JSON object")
        section = next((k for k in RUN_CONFIG_SECTIONS if not isinstance(config.get(k, {}), dict)), None)
        if section is not None:
            raise FluxtrainError(f"{path}: its run config's {section} section is not a JSON object")
        missing = {"torch", "batches"} - groups["rng"].keys()
        if missing:
            raise KeyError(f"rng/{sorted(missing)[0]}")
        wrong = next((k for k, v in groups["rng"].items() if v.dtype != torch.uint8 or v.dim() != 1), None)
        if wrong is not None:
            raise FluxtrainError(f"{path}: its random-number state rng/{wrong} is not a byte vector")
        cpu_state_size = torch.get_rng_state().numel()  # torch's CPU generator and the batch sampler's
        cpu_states = [k for k in groups["rng"] if k in ("torch", "batches") or k.endswith("/torch")]
        wrong = next((k for k in cpu_states if groups["rng"][k].numel() != cpu_state_size), None)
        if wrong is not None:
            raise FluxtrainError(
                f"{path}: its random-number state rng/{wrong} has {groups['rng'][wrong].numel()} bytes, "
                f"a CPU generator's has {cpu_state_size}"
            )
        # Each state a generator takes, every rank's too: checked here, before any rank sets a file aside
        wrong = next((k for k in cpu_states if not takes_state(groups["rng"][k])), None)
        if wrong is not None:
            raise FluxtrainError(f"{path}: its random-number state rng/{wrong} is not a CPU generator's state")
        check_dtypes(groups["model"], path)
        bad = first_non_finite(groups["optim"])
        if bad is not None:
            raise FluxtrainError(f"{path}: its optimizer state optim/{bad} holds NaN or infinite values")
        bad = next((k for k, v in groups["optim"].items() if k.endswith("exp_avg_sq") and (v < 0).any()), None)
        if bad is not None:
            raise FluxtrainError(f"{path}: its optimizer state optim/{bad} (a mean of squares) holds negative values")
        bad = first_non_finite(groups["model"])
        if bad is not None:
            raise FluxtrainError(f"{path}: weight {bad} holds NaN or infinite values")
    except FluxtrainError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise FluxtrainError(f"{path}: damaged checkpoint metadata ({type(e).__name__}: {e})") from None
    return Checkpoint(
        path=path,
        model_config=model_config,
        vocab_size=vocab_size,
        tokenizer_json=meta["tokenizer"],
        config=config,
        progress=progress,
        model=groups["model"],
        optimizer=optimizer,
        scaler=scaler,
        rng=groups["rng"],
    )


def restore(
    ckpt: Checkpoint,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch_gen: torch.Generator,
) -> Progress:
    """Load weights, optimizer, scaler and RNG states into freshly built objects; returns the saved progress.

    The optimizer's hyperparameters (betas, weight decay...) stay as the current config sets them.
    """
    source = str(ckpt.path)
    plain = unwrap(model)
    if is_sharded(plain):
        check_weights(plain, ckpt.model, source)  # a sharded model's state_dict holds the whole weights' shapes
        load_full_weights(plain, ckpt.model)
    else:
        load_state_into(plain, ckpt.model, source)
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    try:
        check_optimizer_state(ckpt.optimizer, optimizer)
        optimizer.load_state_dict(shard_optimizer_state(optimizer, ckpt.optimizer))
    except (ValueError, KeyError, IndexError, RuntimeError, TypeError) as e:
        raise FluxtrainError(f"{source}: optimizer state does not fit this optimizer ({first_line(e)})") from None
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)
    if ckpt.scaler and scaler.is_enabled():
        try:
            scaler.load_state_dict(ckpt.scaler)
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise FluxtrainError(f"{source}: its grad-scaler state cannot be restored ({first_line(e)})") from None
    try:
        set_rng_state(ckpt.rng, batch_gen, model_device(unwrap(model)))
    except (RuntimeError, ValueError, TypeError) as e:
        raise FluxtrainError(f"{source}: its random-number state cannot be restored ({first_line(e)})") from None
    return ckpt.progress


def check_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError naming the first saved optimizer tensor (`optim/<index>/<name>`: Adam's moments, a momentum
    buffer) that does not fit: the state of no parameter, of another shape than its parameter's, stored as no
    floating-point type, or missing where the other parameters of its group have it. Torch would load such a state
    and fail, or broadcast it, at the first step."""
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint has {len(state['param_groups'])} parameter groups, this optimizer "
            f"{len(optimizer.param_groups)}"
        )
    owned = {index for saved in state["param_groups"] for index in saved["params"]}
    stray = next((index for index in state["state"] if index not in owned), None)
    if stray is not None:
        raise ValueError(f"optim/{stray} is the state of none of the checkpoint's {len(owned)} parameters")
    for saved, group in zip(state["param_groups"], optimizer.param_groups, strict=True):  # torch checks the sizes
        states = [state["state"].get(index, {}) for index in saved["params"]]
        names = set().union(*states)
        for index, param, param_state in zip(saved["params"], group["params"], states, strict=False):
            missing = sorted(names - param_state.keys()) if param_state else []
            if missing:
                raise ValueError(f"optim/{index}/{missing[0]} is missing (other parameters of its group have it)")
            for name, value in param_state.items():
                if not torch.is_tensor(value) or value.dim() == 0:  # Adam's step count
                    continue
                if value.shape != param.shape:
                    raise ValueError(
                        f"optim/{index}/{name} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}"
                    )
                if value.dtype not in WEIGHT_DTYPES:
                    raise ValueError(f"optim/{index}/{name} is stored as {str(value.dtype).removeprefix('torch.')}")
