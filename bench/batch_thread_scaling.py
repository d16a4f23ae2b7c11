"""How well two batch threads run at once: one part's forward + backward alone on one thread, against two parts at
once on two batch threads (`train.batch_threads=2`), for the reference shape's parts (6 of its 12 sequences).

python bench/batch_thread_scaling.py            # eager, compiled (C++ wrapper), compiled (Python wrapper)
python bench/batch_thread_scaling.py --rounds 25

With perfect scaling the two parts at once take as long as one alone (ratio 1.00); 2.00 would mean they ran one
after the other. Each variant runs in a process of its own; within it, the two measurements alternate, window by
window, and the ratio is the median of the ratios within each round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxtrain import host  # noqa: E402
from fluxtrain.batch_threads import BatchThreads, single_threaded  # noqa: E402
from fluxtrain.model import GPT, ModelConfig  # noqa: E402

VOCAB = 65
SHAPE = dict(d_model=128, n_heads=4, n_layers=4, ff_dim=512, seq_len=64, bias=False, dropout=0.0)
PART = 6  # sequences per part: the reference batch of 12 over two threads
VARIANTS = {"eager": None, "compiled, C++ wrapper": True, "compiled, Python wrapper": False}


def measure(variant: str, rounds: int, steps: int) -> tuple[float, float, float]:
    """(ms for one part alone, ms for two parts at once, median ratio) in this process."""
    host.configure(0, True)
    model = GPT(ModelConfig(**SHAPE), VOCAB)
    params = list(model.parameters())
    cpp_wrapper = VARIANTS[variant]
    if cpp_wrapper is not None:
        model = torch.compile(model, options={"cpp_wrapper": cpp_wrapper})
    generator = torch.Generator().manual_seed(0)
    shape = (PART, SHAPE["seq_len"])
    x, y = (torch.randint(VOCAB, shape, generator=generator) for _ in range(2))
    parts = [(x, y), (x.clone(), y.clone())]  # the same tokens, each thread its own tensors

    def forward_backward(xy):
        _, loss = model(*xy)
        return torch.autograd.grad(loss, params)

    threads = BatchThreads(2)
    with single_threaded():  # compiled as the trainer compiles it for batch threads: single-threaded, on one part
        for _ in range(3):
            forward_backward(parts[0])

    def alone():
        with single_threaded():
            forward_backward(parts[0])

    def together():
        threads.map(forward_backward, parts)

    def window(fn) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - start) / steps * 1e3

    for _ in range(3):
        alone(), together()
    pairs = [(window(alone), window(together)) for _ in range(rounds)]
    threads.close()
    one = statistics.median(a for a, _ in pairs)
    two = statistics.median(b for _, b in pairs)
    return one, two, statistics.median(b / a for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=8, help="steps per window")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one variant, in a child
    args = parser.parse_args()
    if args.variant:
        print(*measure(args.variant, args.rounds, args.steps))
        return
    print(f"| variant (parts of {PART} x {SHAPE['seq_len']}) | one part alone, ms | two parts at once, ms | ratio |")
    print("|---|--:|--:|--:|")
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--rounds", str(args.rounds)]
        out = subprocess.run([*command, "--steps", str(args.steps)], capture_output=True, text=True, check=True)
        one, two, ratio = (float(v) for v in out.stdout.split())
        print(f"| {variant} | {one:.1f} | {two:.1f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
