"""The machine a process runs on: which device it uses, torch's thread count and how malloc treats freed memory.

A training step on CPU allocates its activations and gradients afresh, and frees them, every step. With its
defaults, glibc's malloc serves large blocks with fresh mmap calls and hands freed memory at the top of its heap back
to the kernel, so each step touches new pages, each a page fault: 950 to 2,500 per step of the reference shape
(4 layers, width 128, batch 12 x 64 tokens), about 1-2 us each on a virtual machine. Keeping freed memory in the heap
for the next step leaves most steps without any: 5% more tokens/s there (see bench/README.md, "Training speed").
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import platform

import torch

from fluxtrain.errors import FluxtrainError

log = logging.getLogger(__name__)

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit systems: larger blocks are always mmapped
TRIM_THRESHOLD = 1024 * 1024 * 1024  # keep up to 1 GiB of freed memory at the top of the heap


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve blocks up to 32 MiB from its heap and to keep freed memory for reuse.

    Returns False (and changes nothing) where the C library is not glibc. The settings hold for the rest of the
    process; its resident memory then stays near its peak instead of shrinking between steps.
    """
    if not is_glibc():
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False


def max_threads() -> int:
    """The most CPU threads a setting may ask for: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads: int, setting: str, allow_zero: bool) -> None:
    """A thread count the machine can run: at least 1 (or 0 for torch's default) and at most one per core."""
    low = 0 if allow_zero else 1
    if not low <= threads <= max_threads():
        default = " (0: torch's default)" if allow_zero else ""
        given = f"{setting} {threads}" if setting.startswith("--") else f"{setting}={threads}"
        raise FluxtrainError(f"{given} must be from {low} to {max_threads()}, the CPU cores here{default}")


def use_threads(threads: int | None, setting: str) -> None:
    """A command's `--threads N` (None: torch's default), checked, for the rest of the process."""
    if threads is not None:
        check_threads(threads, setting, allow_zero=False)
        torch.set_num_threads(threads)


def configure(threads: int, keep_cpu_memory: bool) -> None:
    """Apply `train.threads` (0: torch's default) and `train.keep_cpu_memory` to this process."""
    if threads:
        torch.set_num_threads(threads)
    if keep_cpu_memory and not keep_freed_memory():
        log.info("train.keep_cpu_memory: not a glibc system, malloc keeps its defaults")


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a device that is not there is an error naming it."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FluxtrainError(f"{setting}={name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FluxtrainError(f"{setting}={name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FluxtrainError(f"{setting}={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise FluxtrainError(f"{setting}={name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise FluxtrainError(f"{setting}={name!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def collect_less() -> None:
    """For a command's own process, not a library user's: set what the imports made aside from the garbage collector
    (gc.freeze: torch's objects, which live as long as the process), and skip the collector's pass at exit, which
    would scan every object to free memory the process hands back whole. About a second of a command's start and end.
    atexit runs the second freeze before logging's own handler, so the log files are still flushed and closed; the
    run's own files are closed before."""
    gc.freeze()
    atexit.register(gc.freeze)
