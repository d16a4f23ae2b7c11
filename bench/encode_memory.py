"""Benchmark: peak memory and time of encoding a large generated corpus into the token cache, then of reusing it.

    python bench/encode_memory.py --size-mb 200 --tokenizer char
    python bench/encode_memory.py --size-mb 200 --tokenizer bpe

Generates `--size-mb` of text as 20 files in `--workdir`, then runs `load_corpus` twice in fresh processes under
`/usr/bin/time -v` (first run: build the tokenizer and encode; second run: everything from the cache) and prints wall
time and peak resident memory of each. Target: peak RAM under 1 GB for 200 MB.
"""

from __future__ import annotations

import argparse
import logging
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

N_FILES = 20


def generate(folder: Path, size_mb: int, seed: int = 0) -> None:
    """Prose-like text from a few thousand made-up words, with speaker lines, punctuation and some non-ASCII."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "ri", "an", "the", "ver", "mo", "st", "el", "qu", "ün", "sé", "or", "ing", "pa", "dé"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(4000)]
    names = [w.upper() for w in words[:40]]
    folder.mkdir(parents=True, exist_ok=True)
    per_file = size_mb * 1_000_000 // N_FILES
    for i in range(N_FILES):
        with open(folder / f"part_{i:03d}.txt", "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                lines = [f"{rng.choice(names)}:"]
                for _ in range(rng.randint(1, 4)):
                    line = " ".join(rng.choices(words, k=rng.randint(4, 12)))
                    lines.append(line[0].upper() + line[1:] + rng.choice([".", ",", "!", "?", ";"]))
                block = "\n".join(lines) + "\n\n"
                written += len(block.encode("utf-8"))
                f.write(block)


def child(corpus: Path, cache: Path, tokenizer: str) -> None:
    from fluxtrain.data import DataConfig, load_corpus
    from fluxtrain.tokenizer import TokenizerConfig

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    t0 = time.perf_counter()
    data, tok, _ = load_corpus(
        DataConfig(path=str(corpus), cache_dir=str(cache)), TokenizerConfig(kind=tokenizer, vocab_size=1024), 256
    )
    n_tokens = len(data.train) + len(data.val)
    print(f"  load_corpus: {time.perf_counter() - t0:.1f}s, {n_tokens:,} tokens, vocab {tok.vocab_size}")


def measure(args: argparse.Namespace, corpus: Path, cache: Path) -> tuple[float, int]:
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", str(corpus), str(cache), args.tokenizer]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stdout + proc.stderr)
    print("\n".join(line for line in proc.stdout.splitlines()))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return seconds, peak_kb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fluxtrain-bench-encode"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return
    corpus = args.workdir / f"corpus_{args.size_mb}mb"
    if not corpus.is_dir():
        t0 = time.perf_counter()
        generate(corpus, args.size_mb)
        print(f"generated {args.size_mb} MB in {time.perf_counter() - t0:.0f}s into {corpus}")
    n_bytes = sum(p.stat().st_size for p in corpus.iterdir())
    cache = args.workdir / f"cache_{args.tokenizer}"
    shutil.rmtree(cache, ignore_errors=True)
    print(f"corpus: {N_FILES} files, {n_bytes / 1e6:.1f} MB | tokenizer {args.tokenizer}")
    for label in ("first run (build tokenizer + encode)", "second run (from the cache)"):
        seconds, peak_kb = measure(args, corpus, cache)
        print(f"{label}: wall {seconds:.1f}s | peak RSS {peak_kb / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
