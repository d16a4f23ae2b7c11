"""torch.compile for training: the whole model or each of its blocks, tried on one batch before training starts."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from fluxtrain.errors import describe_failure, is_out_of_memory

log = logging.getLogger("fluxtrain")


def compile_model(
    model: nn.Module,
    blocks: nn.ModuleList,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Callable,
    scope: str = "model",
    cpp_wrapper: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """`torch.compile` the whole model (scope "model") or each of its `blocks` in place (scope "blocks"), tried on
    one batch; where compilation fails, the eager model with a warning. `cpp_wrapper`: inductor's C++ wrapper.

    Compiling the blocks compiles one graph that every block reuses: a fraction of the whole model's compile time, for
    steps a little slower, since nothing is fused across block boundaries. torch.compile compiles lazily, so a missing
    C compiler or an unsupported platform shows only in the first step: one forward and backward on (x, y) here lets
    the run fall back to eager mode before training starts.
    """
    options = {"cpp_wrapper": True} if cpp_wrapper else None
    try:
        if scope == "blocks":
            for block in blocks:
                block.compile(options=options)
            compiled = model
        else:
            compiled = torch.compile(model, options=options)
        with autocast():
            _, loss = compiled(x, y)
        loss.backward()
    except Exception as e:  # any compiler failure: the eager model still trains
        if is_out_of_memory(e):
            raise  # the eager model would not fit either
        # Inductor cannot save the RNG state that checkpointed blocks replay in a whole-model graph; per block it can.
        hint = (
            " (with train.activation_checkpointing=true, try train.compile_scope=blocks)"
            if scope == "model" and activation_checkpointing
            else ""
        )
        log.warning(f"train.compile=true: torch.compile failed ({describe_failure(e)}); training eagerly{hint}")
        torch._dynamo.reset()
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile() set: back to the plain forward
        compiled = model
    model.zero_grad(set_to_none=True)
    return compiled
