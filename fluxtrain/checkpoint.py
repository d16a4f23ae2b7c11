"""Model files and full training checkpoints: safetensors with JSON metadata, written atomically, read without pickle.

A model file holds the weights, the model config and the tokenizer. A checkpoint (`iter_XXXXXX.ckpt`) holds the same
plus everything the loop needs to continue exactly: optimizer and grad-scaler state, RNG states, progress and config.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from fluxtrain.distributed import full_optimizer_state, load_full_weights, model_device, shard_optimizer_state
from fluxtrain.errors import FluxtrainError, first_line
from fluxtrain.files import atomic_write
from fluxtrain.host import resolve_device
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.quantize import is_quantized
from fluxtrain.tokenizer import Tokenizer, tokenizer_from_json

MODEL_FORMAT = "fluxtrain-model"
CHECKPOINT_FORMAT = "fluxtrain-checkpoint"
FORMAT_VERSION = "1"
TIED_KEYS = ("head.weight",)  # tied to tok_emb.weight, so stored once
DIGEST_KEY = "sha256"
# What a weight may be stored as (half precision loads into float32 exactly, float64 rounded). Others, such as
# integers or float8 (which torch cannot even check for NaN), are not fluxtrain weights.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers.

    FSDP's `fully_shard` has no wrapper (the model itself holds the shards); `model_state` gathers its weights.
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `fully_shard` split the model's parameters over the ranks (they are DTensors then)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def is_writer() -> bool:
    """Under torch.distributed, rank 0 alone writes files."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the unwrapped model, without the tied head, as contiguous CPU tensors.

    A model sharded by FSDP is gathered whole: every rank must call this, and only rank 0 gets the weights
    (the other ranks get an empty dict).
    """
    model = unwrap(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = model.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in TIED_KEYS}


def content_digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 of the metadata and of the tensors' names, dtypes, shapes and bytes, to detect damaged files."""
    h = hashlib.sha256(json.dumps(sorted((k, v) for k, v in meta.items() if k != DIGEST_KEY)).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


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
    """Write a self-describing model file: weights plus model config and tokenizer in the metadata.

    Under torch.distributed every rank calls this (FSDP gathers the weights collectively); rank 0 writes the file.
    """
    plain = unwrap(model)
    check_full_precision(plain, path)
    if not (is_writer() or is_sharded(plain)):
        return
    state = model_state(plain)
    if not is_writer():
        return
    meta = model_metadata(plain, tokenizer, extra)
    meta[DIGEST_KEY] = content_digest(state, meta)
    atomic_write(path, lambda tmp: tmp.write_bytes(safetensors_bytes(state, metadata=meta)))


def check_full_precision(model: nn.Module, path: str | Path) -> None:
    """Refuse to write a model whose linear layers hold int8 weights (`fluxtrain.quantize`): no file could
    rebuild it."""
    if is_quantized(model):
        raise FluxtrainError(
            f"{Path(path).name} was not written: the model has int8 weights (quantize_int8), and model files and "
            "checkpoints hold full-precision weights; save the model before quantizing it"
        )


def _is(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the annotated type (an int counts as a float; a bool as nothing but a bool)."""
    if get_origin(hint) in (Union, types.UnionType):
        return any(_is(value, arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_is(v, get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _typed(data: Any, cls: type, what: str, source: str) -> dict[str, Any]:
    """`data` as keyword arguments for dataclass `cls`: a JSON object of its fields with values of their types."""
    if not isinstance(data, dict):
        raise FluxtrainError(f"{source}: {what} is not a JSON object")
    hints = get_type_hints(cls)
    unknown = set(data) - hints.keys()
    if unknown:
        raise FluxtrainError(f"{source}: {what} has unknown keys {sorted(unknown)}")
    for key, value in data.items():
        if not _is(value, hints[key]):
            raise FluxtrainError(f"{source}: {what} has {key}={value!r}, which is not {_kind(hints[key])}")
    return data


def _kind(hint: Any) -> str:
    """A type annotation in words: `int | None` -> "an integer or null"."""
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_kind(arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_kind(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def model_config_from_json(text: str, source: str) -> ModelConfig:
    cfg = ModelConfig(**_typed(json.loads(text), ModelConfig, "model config", source))
    try:
        cfg.validate()
    except FluxtrainError as e:
        raise FluxtrainError(f"{source}: {e}") from None
    return cfg


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a fluxtrain model file or checkpoint, with one-line errors for every bad file."""
    path = Path(path)
    if path.is_dir():
        raise FluxtrainError(f"{what} {path} is a folder, not a file")
    if path.exists() and not path.is_file():
        raise FluxtrainError(f"{what} {path} is not a regular file")
    if not path.is_file():
        raise FluxtrainError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise FluxtrainError(f"{what} {path} is empty")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
                raise FluxtrainError(f"{path} is not a fluxtrain {what} (no fluxtrain 'format' in its metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FluxtrainError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        problem = f"is not a readable safetensors {what} (truncated or other format)"
        raise FluxtrainError(f"{path} {problem}: {first_line(e)}") from None
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        version = meta["format_version"]
        raise FluxtrainError(f"{path} has format version {version}; this fluxtrain reads version {FORMAT_VERSION}")
    digest = meta.get(DIGEST_KEY)
    if digest is not None and content_digest(tensors, meta) != digest:
        raise FluxtrainError(f"{path} is corrupt: its content does not match the checksum stored in the file")
    return meta, tensors


def read_model_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and weights of a model file or of a checkpoint (whose weights are stored under `model/`)."""
    meta, tensors = read_safetensors(path, "model file")
    if meta["format"] == CHECKPOINT_FORMAT:
        tensors = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    return meta, tensors


def build_from_metadata(meta: dict[str, str], source: str, state: dict[str, torch.Tensor]) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer the metadata describes, checked against the weights `state` before anything is
    allocated: a file whose metadata claims a model other than its weights is refused, not built."""
    missing = [key for key in ("model_config", "tokenizer", "vocab_size") if key not in meta]
    if missing:
        raise FluxtrainError(f"{source}: damaged model metadata: it has no {missing[0]!r} entry")
    if not meta["vocab_size"].isdigit():
        raise FluxtrainError(f"{source}: damaged model metadata: vocab_size={meta['vocab_size']!r} is not a count")
    vocab_size = int(meta["vocab_size"])
    try:
        cfg = model_config_from_json(meta["model_config"], source)
        tokenizer = tokenizer_from_json(meta["tokenizer"])
    except FluxtrainError:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise FluxtrainError(f"{source}: damaged model metadata ({type(e).__name__}: {first_line(e)})") from None
    if tokenizer.vocab_size != vocab_size:
        raise FluxtrainError(f"{source}: its tokenizer has {tokenizer.vocab_size} tokens, its model {vocab_size}")
    check_weights(shapes_only(cfg, vocab_size, source), state, source)
    bad = first_non_finite(state)  # a checkpoint's weights are checked as it is read (load_checkpoint)
    if bad is not None:
        raise FluxtrainError(f"{source}: weight {bad} holds NaN or infinite values")
    return GPT(cfg, vocab_size), tokenizer


def shapes_only(cfg: ModelConfig, vocab_size: int, source: str) -> GPT:
    """The model `cfg` describes, on the meta device: its weights' shapes, with no memory allocated."""
    try:
        with torch.device("meta"):
            return GPT(cfg, vocab_size)
    except (RuntimeError, TypeError, OverflowError) as e:  # sizes past what torch can hold
        raise FluxtrainError(f"{source}: its model config describes no buildable model ({first_line(e)})") from None


def check_dtypes(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """One-line error naming the first weight stored as anything but a floating-point type torch computes in."""
    wrong = next((k for k, v in state.items() if v.dtype not in WEIGHT_DTYPES), None)
    if wrong is not None:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
        dtype = str(state[wrong].dtype).removeprefix("torch.")
        raise FluxtrainError(f"{source}: weight {wrong} is stored as {dtype}; weights are {allowed}")


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or an infinity, or None."""
    return next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def check_weights(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """One-line errors naming the file when the weights do not fit the model."""
    check_dtypes(state, source)
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


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, with an error naming the file when they do not fit the model."""
    check_weights(model, state, source)
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Rebuild a model and its tokenizer from a model file or checkpoint; the model is in eval mode on `device`
    (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`; one that is not there is an error naming it)."""
    device = resolve_device(str(device), "device")
    meta, state = read_model_file(path)
    model, tokenizer = build_from_metadata(meta, str(path), state)
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), tokenizer


# Full checkpoints ------------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the loop stands, besides model, optimizer and RNGs: enough to continue as if it had never stopped."""

    iteration: int = 0
    best_val_loss: float = math.inf
    train_time: float = 0.0  # seconds of the training loop so far: the spent part of train.max_time
    warmup_done_at: float | None = None  # train_time when the warm-up ended (the time-budget schedule needs it)
    window_losses: list[float] = field(default_factory=list)  # losses since the last logged iteration
    wall_time: float = 0.0  # seconds of the sessions so far, each from its start to its last checkpoint


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


class NonFiniteWeightsError(FluxtrainError):
    """The weights hold NaN or infinite values; such a model is never written to a checkpoint."""


def rng_state(batch_gen: torch.Generator, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every generator that shapes training: torch CPU, the training GPU's (dropout there), the batch sampler.

    Every rank seeds the same and draws the same numbers, so the saving rank's states are every rank's: on resume
    each rank puts the saved GPU state into its own GPU's generator.
    """
    state = {"torch": torch.get_rng_state(), "batches": batch_gen.get_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(rng: dict[str, torch.Tensor], batch_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    batch_gen.set_state(rng["batches"])
    if device.type != "cuda":
        return
    # Older checkpoints hold every GPU's state as the saving process saw them ("cuda/<index>"): this GPU's, as before.
    index = torch.cuda.current_device() if device.index is None else device.index
    cuda_state = rng.get("cuda", rng.get(f"cuda/{index}"))
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
    data = json.loads(text)
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
        progress = Progress(**_typed(json.loads(meta["progress"]), Progress, "progress", str(path)))
        optimizer = _join_optimizer_state(groups["optim"], meta["optimizer"])
        scaler = json.loads(meta["scaler"])
        if not isinstance(scaler, dict):
            raise FluxtrainError(f"{path}: its grad-scaler state is not a JSON object")
        config = json.loads(meta["config"])
        if not isinstance(config, dict):
            raise FluxtrainError(f"{path}: its run config is not a JSON object")
        missing = {"torch", "batches"} - groups["rng"].keys()
        if missing:
            raise KeyError(f"rng/{sorted(missing)[0]}")
        wrong = next((k for k, v in groups["rng"].items() if v.dtype != torch.uint8 or v.dim() != 1), None)
        if wrong is not None:
            raise FluxtrainError(f"{path}: its random-number state rng/{wrong} is not a byte vector")
        cpu_state_size = torch.get_rng_state().numel()  # torch's CPU generator and the batch sampler's
        wrong = next((k for k in ("torch", "batches") if groups["rng"][k].numel() != cpu_state_size), None)
        if wrong is not None:
            raise FluxtrainError(
                f"{path}: its random-number state rng/{wrong} has {groups['rng'][wrong].numel()} bytes, "
                f"a CPU generator's has {cpu_state_size}"
            )
        check_dtypes(groups["model"], path)
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
