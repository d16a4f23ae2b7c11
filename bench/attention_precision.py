"""Causal attention forward + backward on CPU: torch's SDPA in bf16 (what CPU autocast runs), in fp32, and
`fluxtrain.model.attention` on bf16 inputs under autocast (computed in fp32 over at most `CPU_FP32_ATTENTION_KEYS`
keys, in bf16 beyond; returned in bf16).

    python bench/attention_precision.py
    python bench/attention_precision.py --shapes 12x4x64x32 32x4x256x32 16x12x1024x64 --reps 100

q, k and v are strided views of one qkv projection output and the gradient arrives through the output's transpose,
as in `fluxtrain.model.CausalSelfAttention`. Each figure is the median of `--reps` timed calls after warm-up, the
variants taking turns call by call so that a change of the machine's speed hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxtrain.model import CPU_FP32_ATTENTION_KEYS, attention  # noqa: E402

# batch x heads x context x head size: the reference recipe's shape (batch 12), the CPU recipe's and model=small's
# (batch 32), model=medium's (8 heads), the GPU recipe's (6 heads of 64, context 256, batch 64)
SHAPES = ("12x4x64x32", "32x4x64x32", "32x8x64x32", "32x4x128x32", "32x4x256x32", "64x6x256x64")


def variant(name: str, B: int, H: int, T: int, D: int):
    """One attention forward + backward of the named variant, on inputs of its own."""
    dtype = torch.float32 if name == "SDPA fp32" else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    qkv_out = torch.randn(B, T, 3 * H * D, generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(B, T, H * D, generator=generator).to(dtype)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if name != "SDPA fp32" else contextlib.nullcontext()
    fn = attention if name.startswith("fluxtrain") else F.scaled_dot_product_attention

    def run() -> float:
        t0 = time.perf_counter()
        with cast:
            q, k, v = qkv_out.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            y = fn(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H * D)
        y.backward(grad)
        qkv_out.grad = None
        return time.perf_counter() - t0

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="BxHxTxD: batch, heads, context, head size")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ("SDPA bf16 (autocast)", "SDPA fp32", "fluxtrain attention (bf16 inputs)")
    print(
        f"torch {torch.__version__} | {torch.get_num_threads()} threads | forward + backward, median ms | fluxtrain "
        f"computes in fp32 over at most {CPU_FP32_ATTENTION_KEYS} keys"
    )
    print(f"| shape (BxHxTxD) | {' | '.join(names)} | bf16 / fluxtrain |")
    print(f"|---|{'--:|' * (len(names) + 1)}")
    for shape in args.shapes:
        try:
            B, H, T, D = (int(n) for n in shape.split("x"))
        except ValueError:
            sys.exit(f"--shapes: {shape!r} is not BxHxTxD (four whole numbers joined by x)")
        runs = [variant(name, B, H, T, D) for name in names]
        reps = max(3, args.reps // 10) if T * B > 4096 else args.reps
        for run in runs:
            run()  # warm-up
        times = [[] for _ in runs]
        for _ in range(reps):
            for run, ts in zip(runs, times, strict=True):
                ts.append(run())
        med = [1e3 * statistics.median(ts) for ts in times]
        print(f"| {shape} | {' | '.join(f'{m:.2f}' for m in med)} | {med[0] / med[2]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
