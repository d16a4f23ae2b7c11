"""Mixed precision: which devices train under autocast for train.precision, and the fp16 gradient scaler."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("fluxtrain")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocasts(device: torch.device, precision: str) -> bool:
    """Whether `precision` trains under autocast on `device`: bf16 and fp16 on CUDA, bf16 on CPU."""
    return precision != "fp32" and (device.type == "cuda" or (device.type == "cpu" and precision == "bf16"))


def warn_without_autocast(device: torch.device, precision: str, what: str = "training") -> None:
    """One line where `precision` asks for autocast that `device` does not have, so the work runs in fp32."""
    if precision != "fp32" and not autocasts(device, precision):
        where = "CUDA" if precision == "fp16" else "CUDA or CPU"
        log.warning(f"train.precision={precision} needs {where}; {what} in fp32 on {device.type}")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to `precision` where the device has it (`autocasts`); elsewhere training stays fp32."""
    if autocasts(device, precision):
        return torch.autocast(device.type, dtype=PRECISIONS[precision])
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast on CUDA, so small gradients do not underflow; a no-op otherwise."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")
