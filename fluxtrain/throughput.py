"""Throughput figures: the peak FLOP/s of a device and model FLOPs utilisation (MFU; FLOPs per token: model.py)."""

from __future__ import annotations

import functools
import time

import torch

from fluxtrain.precision import PRECISIONS

# Dense bf16 tensor-core peaks (FLOP/s) from the vendor data sheets; fp16 peaks are the same. The first name
# found in the device name wins, so the specific variants come before the family.
GPU_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def table_peak(device_name: str) -> float | None:
    """The bf16 peak of a known GPU from its name (e.g. "NVIDIA H100 80GB HBM3"), else None."""
    for key, peak in GPU_PEAK_BF16:
        if key.lower() in device_name.lower():
            return peak
    return None


def probe_peak(device_type: str, dtype: torch.dtype = torch.float32, size: int = 512, threads: int = 0) -> float:
    """`measure_peak`'s FLOP/s, measured once per process for each setting; on CPU with `threads` torch threads (0:
    as many as torch uses now), so that a sweep's jobs on other thread counts each have their own."""
    return _probed(device_type, dtype, size, (threads or torch.get_num_threads()) if device_type == "cpu" else 0)


def measure_peak(
    device_type: str,
    dtype: torch.dtype = torch.float32,
    size: int = 512,
    threads: int = 0,
    reps: int = 8,
    min_seconds: float = 0.2,
) -> float:
    """FLOP/s of a square matmul on this device (on `threads` torch threads on CPU; 0: as many as torch uses now): the
    best of at least `reps` timed runs spread over at least `min_seconds`, so that a burst of other work on the
    machine does not set the figure.

    The operands come from a generator of their own: drawing them from torch's global one would shift the dropout
    masks of the training run that asked, depending on whether this process had measured the peak before.
    """
    device = torch.device(device_type)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device=device, dtype=dtype) for _ in range(2))
    best, runs = float("inf"), 0
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        start = now = time.perf_counter()
        while runs <= reps or now - start < min_seconds:  # the first run warms up
            _sync(device)
            t0 = time.perf_counter()
            (a @ b).sum().item()
            now = time.perf_counter()
            best, runs = min(best, now - t0), runs + 1
    finally:
        torch.set_num_threads(threads_before)
    return 2 * size**3 / best


_probed = functools.cache(measure_peak)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_flops(device: torch.device, configured: float | None, precision: str, threads: int = 0) -> tuple[float, str]:
    """Peak FLOP/s of one device and where the number comes from.

    `train.peak_flops` when given; for a known GPU training in bf16 or fp16, the table entry; otherwise a matmul
    probe on the device (in the training dtype on CUDA, and on CPU under bf16 autocast; fp32 elsewhere), so that fp32
    training is not measured against tensor-core peaks it cannot use. A CPU is probed on the `threads` that train
    (0: as many as torch uses now).
    """
    if configured is not None:
        return float(configured), "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak(name) if precision in ("bf16", "fp16") else None
        if peak is not None:
            return peak, f"{name} bf16 table"
        return probe_peak("cuda", PRECISIONS[precision], 4096), f"{name} matmul probe"
    if device.type == "cpu" and precision == "bf16":
        return probe_peak("cpu", torch.bfloat16, threads=threads), "cpu bf16 matmul probe"
    return probe_peak(device.type, threads=threads), f"{device.type} matmul probe"


def slow_bf16_warning(device: torch.device, precision: str) -> str | None:
    """A warning when this CPU multiplies bf16 matrices more slowly than fp32 ones, as CPUs without bf16 matrix
    instructions (AVX512-BF16, AMX) may; None elsewhere. Both rates are measured, not looked up."""
    if device.type != "cpu" or precision != "bf16":
        return None
    bf16, fp32 = probe_peak("cpu", torch.bfloat16), probe_peak("cpu")
    if bf16 >= fp32:
        return None
    return (
        f"train.precision=bf16: this CPU multiplies bf16 matrices at {format_flops(bf16)}, slower than "
        f"{format_flops(fp32)} in fp32; train.precision=fp32 trains faster here"
    )


def mfu(tokens_per_sec: float, flops_per_token: int, peak_per_device: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (a fraction, not percent)."""
    return tokens_per_sec * flops_per_token / (peak_per_device * world_size)


def impossible_mfu_warning(mfu: float, peak_source: str) -> str | None:
    """A warning when the model FLOP/s achieved exceed the peak (an MFU above 100%), which says the peak is wrong:
    set too low, or probed while other work held the device; None otherwise."""
    if mfu <= 1:
        return None
    if peak_source == "train.peak_flops":
        cause = "train.peak_flops is below what this device reaches"
    elif "probe" in peak_source:
        cause = f"the peak ({peak_source}) was measured while other work slowed this device; set train.peak_flops"
    else:
        cause = f"the peak ({peak_source}) is below what this device reaches; set train.peak_flops"
    return f"MFU {100 * mfu:.0f}% is above 100%, so the MFU figures of this run are too high: {cause}"


def format_flops(value: float) -> str:
    for unit, scale in (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value / 1e6:.1f} MFLOP/s"
