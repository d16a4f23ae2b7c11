"""Model files: a model's weights, config and tokenizer in one safetensors file with JSON metadata, written
atomically and read without pickle, every damaged or foreign file refused in one line naming it."""

from __future__ import annotations

import hashlib
import json
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch.overrides import TorchFunctionMode

from fluxtrain.errors import FluxtrainError, describe_failure, first_line, is_out_of_memory, out_of_memory_as
from fluxtrain.files import atomic_write, parse_json, user_path
from fluxtrain.host import resolve_device
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.quantize import is_quantized
from fluxtrain.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, tokenizer_from_json

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


RESERVED_KEYS = ("format", "format_version", "model_config", "vocab_size", "tokenizer")  # what model_metadata writes


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


def save_model_file(
    path: str | Path, model: nn.Module, tokenizer: Tokenizer, extra: dict[str, str] | None = None
) -> None:
    """Write a self-describing model file: weights plus model config and tokenizer in the metadata.

    Under torch.distributed every rank calls this (FSDP gathers the weights collectively); rank 0 writes the file.
    """
    path = user_path(path, "model file")
    plain = unwrap(model)
    name = path.name
    if not isinstance(plain, GPT):
        raise FluxtrainError(f"{name} was not written: model must be a fluxtrain GPT, not {type(plain).__name__}")
    if not isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        kind = type(tokenizer).__name__
        raise FluxtrainError(f"{name} was not written: tokenizer must be a CharTokenizer or BPETokenizer, not {kind}")
    check_full_precision(plain, path)
    check_rebuildable(plain, name)
    if tokenizer.vocab_size != plain.vocab_size:
        raise FluxtrainError(
            f"{name} was not written: the tokenizer has {tokenizer.vocab_size} tokens, the model {plain.vocab_size}"
        )
    reserved = sorted((extra or {}).keys() & {*RESERVED_KEYS, DIGEST_KEY})
    if reserved:
        raise FluxtrainError(f"{name} was not written: extra may not set {reserved[0]!r}, which the file describes")
    wrong = next(((k, v) for k, v in (extra or {}).items() if not (isinstance(k, str) and isinstance(v, str))), None)
    if wrong is not None:
        raise FluxtrainError(f"{name} was not written: extra[{wrong[0]!r}]={wrong[1]!r}; its keys and values are texts")
    if not (is_writer() or is_sharded(plain)):
        return
    state = model_state(plain)
    if not is_writer():
        return
    bad = first_non_finite(state)  # no file that loading would refuse
    if bad is not None:
        raise FluxtrainError(f"{name} was not written: weight {bad} holds NaN or infinite values")
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


def check_rebuildable(model: GPT, name: str) -> None:
    """Refuse weights that a GPT built from the model's config would not take (a module added, removed or replaced
    after it was built): loading the file would refuse them."""
    want = {k: tuple(v.shape) for k, v in shapes_only(model.cfg, model.vocab_size, name).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, extra, wrong = weight_mismatch(want, have)
    if extra:
        raise FluxtrainError(
            f"{name} was not written: the model has {_names(extra)}, which a GPT built from its config lacks, so "
            "load_model would refuse the file"
        )
    if missing:
        raise FluxtrainError(
            f"{name} was not written: the model lacks {_names(missing)}, which a GPT built from its config has"
        )
    if wrong is not None:
        raise FluxtrainError(
            f"{name} was not written: weight {wrong} has shape {have[wrong]}; a GPT built from the model's config has "
            f"{want[wrong]}"
        )


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


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


def json_fields(data: Any, cls: type, what: str, source: str) -> dict[str, Any]:
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


# What every model config fluxtrain wrote holds: the block variants came later and default to GPT-2's blocks.
SHAPE_KEYS = ("d_model", "n_heads", "n_layers", "ff_dim", "seq_len")


def model_config_from_json(text: str, source: str) -> ModelConfig:
    fields = json_fields(parse_json(text), ModelConfig, "model config", source)
    missing = [key for key in SHAPE_KEYS if key not in fields]
    if missing:
        raise FluxtrainError(f"{source}: its model config has no {missing[0]}")
    cfg = ModelConfig(**fields)
    try:
        cfg.validate()
    except FluxtrainError as e:
        raise FluxtrainError(f"{source}: {e}") from None
    return cfg


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a fluxtrain model file or checkpoint, with one-line errors for every bad file."""
    path = user_path(path, what)
    if path.is_dir():
        raise FluxtrainError(f"{what} {path} is a folder, not a file")
    if path.exists() and not path.is_file():
        raise FluxtrainError(f"{what} {path} is not a regular file")
    if not path.is_file():
        raise FluxtrainError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise FluxtrainError(f"{what} {path} is empty")
    try:
        with open(path, "rb"):  # safetensors reports a file it may not read as one that does not exist
            pass
    except OSError as e:
        raise FluxtrainError(f"{what} {path} cannot be read: {e.strerror or first_line(e)}") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
                raise FluxtrainError(f"{path} is not a fluxtrain {what} (no fluxtrain 'format' in its metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FluxtrainError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        if is_out_of_memory(e) or "Cannot allocate memory" in str(e):  # safetensors' mmap says so
            raise FluxtrainError(f"{what} {path} does not fit in memory ({describe_failure(e)})") from None
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
    cfg, tokenizer = checked_metadata(meta, source, state)
    return GPT(cfg, tokenizer.vocab_size), tokenizer


def checked_metadata(
    meta: dict[str, str], source: str, state: dict[str, torch.Tensor]
) -> tuple[ModelConfig, Tokenizer]:
    """The model config and tokenizer the metadata describes, once the weights `state` are checked to fit them."""
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
    # Counted from the names first: even on the meta device, a billion claimed blocks would take hours to build.
    n_blocks = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    if cfg.n_layers != n_blocks:
        raise FluxtrainError(f"{source}: its model config has n_layers={cfg.n_layers}, its weights {n_blocks} blocks")
    check_weights(shapes_only(cfg, vocab_size, source), state, source)
    bad = first_non_finite(state)  # a checkpoint's weights are checked as it is read (load_checkpoint)
    if bad is not None:
        raise FluxtrainError(f"{source}: weight {bad} holds NaN or infinite values")
    return cfg, tokenizer


class _NoInit(TorchFunctionMode):
    """Leave new weights as they are made: `torch.nn.init`'s functions do nothing (on the meta device they would
    load torch's compiler, a second of a command's start, to draw no values)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def shapes_only(cfg: ModelConfig, vocab_size: int, source: str) -> GPT:
    """The model `cfg` describes, on the meta device: its weights' shapes, with no memory allocated."""
    try:
        with torch.device("meta"), _NoInit():
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
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in TIED_KEYS}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected, wrong = weight_mismatch(expected, got)
    if missing or unexpected:
        raise FluxtrainError(
            f"{source}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    if wrong is not None:
        raise FluxtrainError(f"{source}: weight {wrong} has shape {got[wrong]}, the model needs {expected[wrong]}")


def weight_mismatch(
    expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]
) -> tuple[list[str], list[str], str | None]:
    """How weight shapes `got` differ from `expected`: the names missing, the names not expected (both sorted), and
    the first name of both whose shape differs (None when all agree)."""
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = next((k for k in expected if k in got and expected[k] != got[k]), None)
    return missing, unexpected, wrong


def load_state_into(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, with an error naming the file when they do not fit the model."""
    check_weights(model, state, source)
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Rebuild a model and its tokenizer from a model file or checkpoint; the model is in eval mode on `device`
    (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`; one that is not there is an error naming it)."""
    device = resolve_device(str(device), "device")
    meta, state = read_model_file(path)
    with out_of_memory_as(f"model file {path} does not fit in memory on {device}"):
        model, tokenizer = build_from_metadata(meta, str(path), state)
        model.load_state_dict(state, strict=False)
        return model.to(device).eval(), tokenizer
