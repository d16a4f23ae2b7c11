"""Decoding speed: tokens per second with and without the KV cache, batch 1, for a 6-layer width-384 model.

    PYTHONPATH=. python bench/generate.py [--tokens 500] [--runs 3] [--threads N] [--context-shift N] [--device D]

Random weights (the speed does not depend on them). Variants, each decoding the same number of greedy tokens:
fp32 with the cache, int8 weights (`--quantize int8` of `fluxtrain.generate`) with the cache, each also with a
compiled decoding step (`--compile`; the compile time is printed and left out of the rates), and fp32 without the
cache (every token re-reads the whole window). The cached variants run `--runs` times, interleaved so that a load
change hits them alike, and the median is reported; the uncached one (slow) runs once. The run checks that the
cached and uncached fp32 paths decode the same tokens, so their ratio compares equal work done two ways, and prints
how far int8 weights move the logits. The load average, the machine's fp32 matmul rate and tokens per CPU-second
of this process are printed too: these shared machines drift, so compare figures from one run.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from fluxtrain.model import GPT, ModelConfig
from fluxtrain.quantize import quantize_int8
from fluxtrain.sampling import SamplingConfig, compile_decoding, sample_stream
from fluxtrain.throughput import probe_peak

BENCH_MODEL = ModelConfig(d_model=384, n_heads=6, n_layers=6, ff_dim=1536, seq_len=256)
VOCAB_SIZE = 65  # Tiny Shakespeare's characters


def timed_decode(model: GPT, prompt: list[int], cfg: SamplingConfig, use_cache: bool) -> tuple[list[int], float, float]:
    """The new ids, the wall-clock seconds and the CPU seconds of this process."""
    generator = torch.Generator().manual_seed(0)
    start, start_cpu = time.perf_counter(), time.process_time()
    ids = list(sample_stream(model, prompt, cfg, generator, use_cache))
    return ids, time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=500, help="new tokens per run")
    p.add_argument("--runs", type=int, default=3, help="runs of each cached variant (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--context-shift", type=int, default=None, help="default: seq_len // 4; 1 = exact slide")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling with top-k 40")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-uncached", action="store_true", help="time only the cached paths")
    p.add_argument("--no-compile", action="store_true", help="skip the variants with a compiled decoding step")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT(BENCH_MODEL, VOCAB_SIZE).to(args.device).eval()
    int8_model = quantize_int8(copy.deepcopy(model))
    cfg = SamplingConfig(max_new_tokens=args.tokens, temperature=args.temperature, context_shift=args.context_shift)
    prompt = [0]
    load = os.getloadavg()
    print(
        f"model: {model.num_params() / 1e6:.1f}M parameters, {BENCH_MODEL.n_layers} layers, width "
        f"{BENCH_MODEL.d_model}, context {BENCH_MODEL.seq_len} | {args.tokens} new tokens, batch 1, context shift "
        f"{cfg.shift_for(BENCH_MODEL.seq_len)} | device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()})"
    )
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.device == "cpu":  # the machine's speed now: these shared machines drift
        print(f"fp32 matmul rate now: {probe_peak('cpu') / 1e9:.0f} GFLOP/s")

    variants = {"fp32, cache": model, "int8 weights, cache": int8_model}
    if not args.no_compile:  # `fluxtrain-generate --compile`: compiled once, before the timed runs
        for name, m in list(variants.items()):
            compiled = copy.deepcopy(m)
            start = time.perf_counter()
            failure = compile_decoding(compiled)
            print(
                f"{name}: decoding step compiled in {time.perf_counter() - start:.1f}s"
                + (f" ({failure})" * bool(failure))
            )
            variants[f"{name}, compiled step"] = compiled
    warm = SamplingConfig(max_new_tokens=20, temperature=0.0)
    for m in variants.values():
        timed_decode(m, prompt, warm, use_cache=True)
    results: dict[str, list[tuple[list[int], float, float]]] = {name: [] for name in variants}
    for _ in range(args.runs):
        for name, m in variants.items():
            results[name].append(timed_decode(m, prompt, cfg, use_cache=True))
    if not args.skip_uncached:
        results["fp32, no cache"] = [timed_decode(model, prompt, cfg, use_cache=False)]

    median_rate = {name: statistics.median(args.tokens / wall for _, wall, _ in runs) for name, runs in results.items()}
    uncached = median_rate.get("fp32, no cache")
    print(f"\n| variant | tokens/s (median of {args.runs}) | range | tokens per CPU-second | vs fp32 without cache |")
    print("|---|--:|--:|--:|--:|")
    for name, runs in results.items():
        rates = [args.tokens / wall for _, wall, _ in runs]
        cpu_rate = statistics.median(args.tokens / cpu for _, _, cpu in runs)
        ratio = f"{median_rate[name] / uncached:.1f}x" if uncached else "-"
        print(f"| {name} | {median_rate[name]:.1f} | {min(rates):.1f}-{max(rates):.1f} | {cpu_rate:.1f} | {ratio} |")
    if uncached:
        same = results["fp32, cache"][0][0] == results["fp32, no cache"][0][0]
        print(f"fp32 cached and uncached tokens: {'identical' if same else 'DIFFERENT'}")
    with torch.inference_mode():  # how far int8 weights move the logits (random weights: near-uniform logits)
        idx = torch.randint(VOCAB_SIZE, (1, BENCH_MODEL.seq_len), generator=torch.Generator().manual_seed(1))
        exact, approx = model(idx.to(args.device))[0], int8_model(idx.to(args.device))[0]
        error = float((approx - exact).abs().max() / exact.abs().max())
    print(f"int8 logits: largest difference from fp32 {100 * error:.1f}% of the largest fp32 logit")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
