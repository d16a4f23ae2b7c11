"""Weight-only int8 quantization of a trained model, for faster decoding on CPU.

Decoding one token at a time reads every weight once per token, so on a CPU its speed is set by how many bytes of
weights it reads. Storing each linear layer's weight as int8 with one scale per output row (symmetric, round to
nearest) reads 4x fewer bytes than fp32. Activations stay in the model's dtype; on CPU the matrix product runs in
torch's int8-weight kernel (`torch._weight_int8pack_mm`, bfloat16 activations); prompts, other devices, and layers
whose input width the kernel cannot take use a matmul with the dequantized weight.
The token embedding (tied to the output head) and the norms keep their full precision.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fluxtrain.errors import FluxtrainError

QUANTIZE_CHOICES = ("none", "int8")
# From this many input rows on (a prompt rather than one new token), dequantizing the weight and running an fp32
# matmul beats the int8 kernel on CPU: measured 0.56 vs 1.12 ms at 64 rows, 1.3 vs 3.4 ms at 192 (1536 x 384).
DEQUANTIZE_ROWS = 64
# The CPU kernel reads each row of weights and inputs in aligned blocks of 16 values (8 on AVX2 and ARM) and has no
# code for a remainder: another input width reads past the rows, giving garbage or a segmentation fault.
KERNEL_WIDTH_MULTIPLE = 16


class Int8Linear(nn.Module):
    """A frozen `nn.Linear` with an int8 weight (out, in) and a per-output-row scale, for inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        # (out,): the row's largest weight maps to 127. The kernel takes bfloat16 scales, so the weights are
        # rounded against the bfloat16 scale itself: each one is then within half a step of its true value.
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16)
        self.register_buffer("weight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.kernel_fits(x2d):
            # A fresh copy: the kernel needs rows that start aligned, which a view into a larger tensor may not.
            a = x2d.to(torch.bfloat16, memory_format=torch.contiguous_format, copy=True)
            # The kernel takes bfloat16 scales: a model moved to another dtype after quantizing moved them too.
            y = torch._weight_int8pack_mm(a, self.weight, self.scale.to(torch.bfloat16))
            y = (y + self.bias if self.bias is not None else y).to(x.dtype)  # the product is bfloat16
        else:
            y = F.linear(x2d, self.dequantized(x.dtype), self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def kernel_fits(self, x2d: torch.Tensor) -> bool:
        """Whether the int8 kernel computes `x2d` (rows, in_features) correctly, and faster than a dequantized
        matmul: on CPU, for fewer than DEQUANTIZE_ROWS rows, with an input width the kernel reads whole."""
        return x2d.is_cpu and x2d.size(0) < DEQUANTIZE_ROWS and self.in_features % KERNEL_WIDTH_MULTIPLE == 0

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight (out, in) back in `dtype`, as the int8 values times their row's scale."""
        return self.weight.to(dtype).mul_(self.scale.to(dtype).unsqueeze(1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every `nn.Linear` not tied to an embedding by an `Int8Linear`; returns the model.

    The model is switched to eval mode: a quantized model is for decoding, not for training.
    """
    model.eval()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # a tied head stays
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and id(child.weight) not in embeddings:
                setattr(module, name, Int8Linear(child))
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether `quantize_int8` replaced any of the model's linear layers."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def apply_quantization(model: nn.Module, mode: str, setting: str = "--quantize") -> nn.Module:
    """`mode` none | int8, named by `setting` in the error for any other value."""
    if mode not in QUANTIZE_CHOICES:
        raise FluxtrainError(f"{setting} {mode!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    return quantize_int8(model) if mode == "int8" else model
