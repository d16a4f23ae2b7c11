"""Benchmark: random batches from the memmap token cache versus the former in-memory int64 tensor, side by side.

    python bench/batch_speed.py [--corpus ../shared/data/tinyshakespeare.txt]

Times `TokenData.get_batch` (numpy fancy indexing on the memmap, then torch.from_numpy) against gathering from an
in-memory torch tensor, interleaved in one process, for two batch shapes; then times short training runs of the small
preset fed by each, interleaved, and prints tokens per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from fluxtrain.data import DataConfig, TokenData, load_corpus
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.tokenizer import TokenizerConfig


class TensorBatches:
    """The former batch source: the split held as an int64 tensor, windows gathered with torch indexing."""

    def __init__(self, data: TokenData):
        self.seq_len = data.seq_len
        self.train = torch.from_numpy(np.asarray(data.train).astype(np.int64))

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator):
        starts = torch.randint(len(self.train) - self.seq_len, (batch_size,), generator=generator)
        window = self.train[starts[:, None] + torch.arange(self.seq_len + 1)]
        return window[:, :-1], window[:, 1:]


def time_batches(source, batch_size: int, n: int) -> float:
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(n):
        source.get_batch("train", batch_size, gen)
    return (time.perf_counter() - t0) / n * 1e6


def time_training(source, batch_size: int, seq_len: int, vocab: int, steps: int) -> float:
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=128, n_heads=4, n_layers=2, ff_dim=512, seq_len=seq_len), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = source.get_batch("train", batch_size, gen)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch_size * seq_len / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        for batch_size, seq_len in ((12, 64), (64, 256)):
            cfg = DataConfig(path=args.corpus, cache_dir=cache)
            data, tok, _ = load_corpus(cfg, TokenizerConfig(), seq_len)
            assert isinstance(data.train.base, np.memmap)
            tensor = TensorBatches(data)
            memmap_us, tensor_us = [], []
            for _ in range(args.rounds):
                memmap_us.append(time_batches(data, batch_size, 2000))
                tensor_us.append(time_batches(tensor, batch_size, 2000))
            print(
                f"get_batch B={batch_size} T={seq_len}: memmap {min(memmap_us):.1f} us | "
                f"in-memory tensor {min(tensor_us):.1f} us (best of {args.rounds} x 2000 calls)"
            )
        data, tok, _ = load_corpus(DataConfig(path=args.corpus, cache_dir=cache), TokenizerConfig(), 64)
        tensor = TensorBatches(data)
        memmap_tps, tensor_tps = [], []
        for _ in range(args.rounds):
            memmap_tps.append(time_training(data, 12, 64, tok.vocab_size, 40))
            tensor_tps.append(time_training(tensor, 12, 64, tok.vocab_size, 40))
        print(
            f"training small preset B=12 T=64: memmap {np.median(memmap_tps):,.0f} tok/s | "
            f"in-memory tensor {np.median(tensor_tps):,.0f} tok/s (median of {args.rounds} x 40 steps)"
        )


if __name__ == "__main__":
    main()
