"""Decoding speed: tokens per second with and without the KV cache, batch 1, for a 6-layer width-384 model.

    PYTHONPATH=. python bench/generate.py [--tokens 500] [--threads 1] [--context-shift N] [--device cpu]

Random weights (the speed does not depend on them). Both paths decode the same greedy tokens (the run checks it),
so the ratio compares equal work done two ways. On a shared machine, the load average and the CPU seconds of this
process are printed too: tokens per CPU-second is closer to what an idle machine gives than tokens per wall second.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from fluxtrain.model import GPT, ModelConfig
from fluxtrain.sampling import SamplingConfig, sample_stream

BENCH_MODEL = ModelConfig(d_model=384, n_heads=6, n_layers=6, ff_dim=1536, seq_len=256)
VOCAB_SIZE = 65  # Tiny Shakespeare's characters


def timed_decode(model: GPT, prompt: list[int], cfg: SamplingConfig, use_cache: bool) -> tuple[list[int], float, float]:
    """The new ids, the wall-clock seconds and the CPU seconds of this process."""
    generator = torch.Generator().manual_seed(0)
    start, start_cpu = time.perf_counter(), time.process_time()
    ids = list(sample_stream(model, prompt, cfg, generator, use_cache))
    return ids, time.perf_counter() - start, time.process_time() - start_cpu


def report(name: str, n_tokens: int, wall_s: float, cpu_s: float) -> None:
    print(
        f"{name:9} {n_tokens / wall_s:8.1f} tokens/s ({wall_s:.2f} s wall) | {n_tokens / cpu_s:8.1f} tokens per "
        f"CPU-second ({cpu_s:.2f} s CPU)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=500, help="new tokens per run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--context-shift", type=int, default=None, help="default: seq_len // 4; 1 = exact slide")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling with top-k 40")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-uncached", action="store_true", help="time only the cached path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT(BENCH_MODEL, VOCAB_SIZE).to(args.device).eval()
    cfg = SamplingConfig(max_new_tokens=args.tokens, temperature=args.temperature, context_shift=args.context_shift)
    prompt = [0]
    shift = cfg.shift_for(BENCH_MODEL.seq_len)
    load = os.getloadavg()
    print(
        f"model: {model.num_params() / 1e6:.1f}M parameters, {BENCH_MODEL.n_layers} layers, width "
        f"{BENCH_MODEL.d_model}, context {BENCH_MODEL.seq_len} | {args.tokens} new tokens, batch 1, "
        f"context shift {shift} | device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()})"
    )
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    timed_decode(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0.0), use_cache=True)  # warm-up
    cached_ids, cached_s, cached_cpu = timed_decode(model, prompt, cfg, use_cache=True)
    report("cached:", args.tokens, cached_s, cached_cpu)
    if not args.skip_uncached:
        uncached_ids, uncached_s, uncached_cpu = timed_decode(model, prompt, cfg, use_cache=False)
        report("uncached:", args.tokens, uncached_s, uncached_cpu)
        print(f"speed-up with the cache: {uncached_s / cached_s:.1f}x wall, {uncached_cpu / cached_cpu:.1f}x CPU")
        same = "identical" if cached_ids == uncached_ids else "DIFFERENT"
        print(f"cached and uncached tokens: {same}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
