"""Training throughput (tokens/s) and MFU: a minimal plain-PyTorch GPT vs fluxtrain, eager and compiled.

    python bench/train_throughput.py                      # reference shape + presets, eager and compiled
    python bench/train_throughput.py --presets none       # reference shape only
    python bench/train_throughput.py --no-compile --windows 5 --window-steps 20

Every variant runs the same training step: sample a batch of random windows, forward, backward, clip the gradient
norm to 1.0, optimizer step, zero the gradients, read the loss. One more runs the trainer's own step
(`fluxtrain.train.train_step` on `TokenData` batches), to show what the trainer's loop gets. The rows "N batch
threads" split the batch over N threads of one torch thread each (`train.batch_threads`, N = the cores here by
default; `--batch-threads 1` leaves them out). Each variant runs in a
process of its own: the plain baseline with the process defaults a plain PyTorch script gets, fluxtrain set up as
its trainer sets itself up (`fluxtrain.host.configure`). Windows of the variants are interleaved (round robin, one
process running at a time), so a load change on a shared machine hits all of them alike. tokens/s is the median
over windows, after warm-up; the ratio to the baseline is the median over rounds of the ratio within the round.
MFU is measured tokens/s x training FLOPs per token / the matmul rate measured in the same run, in the variant's
precision: the rows "bf16 autocast" (`train.precision=bf16`) against the bf16 rate, the others against fp32's.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fluxtrain import host  # noqa: E402
from fluxtrain.batch_threads import BatchThreads  # noqa: E402
from fluxtrain.data import TokenData  # noqa: E402
from fluxtrain.distributed import World  # noqa: E402
from fluxtrain.model import GPT, ModelConfig, flops_per_token  # noqa: E402
from fluxtrain.optim import OptimConfig, build_optimizer  # noqa: E402
from fluxtrain.precision import autocast_context, grad_scaler  # noqa: E402
from fluxtrain.train import TrainConfig, train_step  # noqa: E402

VOCAB = 65  # Tiny Shakespeare, character level
REFERENCE = dict(d_model=128, n_heads=4, n_layers=4, ff_dim=512, seq_len=64)
REFERENCE_BATCH = 12
PRESET_BATCH = 32  # train.batch_size default
PRESETS = {
    "small": dict(d_model=128, n_heads=4, n_layers=2, ff_dim=512, seq_len=64),
    "medium": dict(d_model=256, n_heads=8, n_layers=4, ff_dim=1024, seq_len=64),
    "large": dict(d_model=512, n_heads=16, n_layers=6, ff_dim=2048, seq_len=64),
}


# ---------------------------------------------------------------------------------------------------------------
# The baseline: a self-contained minimal GPT in plain PyTorch, written the usual way (nanoGPT-style: fused qkv,
# SDPA, pre-norm, GELU MLP, tied head, no bias, AdamW with weight decay on matrices).
class MiniAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MiniBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, ff: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.attn = MiniAttention(d, n_heads)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, ff, bias=False)
        self.c_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class MiniGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_heads: int, n_layers: int, ff: int, seq_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq_len, d)
        self.h = nn.ModuleList(MiniBlock(d, n_heads, ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def mini_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))


# ---------------------------------------------------------------------------------------------------------------
def matmul_peak_flops(
    size: int = 1024, reps: int = 5, seconds: float = 1.0, dtype: torch.dtype = torch.float32
) -> float:
    """The matmul rate (FLOP/s) of this machine now in `dtype`: best of `reps` timed runs of size x size matmuls."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / reps:
            a @ b
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - t0))
    return best


@dataclass
class Spec:
    """One variant of the training step; it runs in a process of its own (see `start`)."""

    name: str
    kind: str  # plain | fluxtrain
    shape: dict
    batch: int
    compile: bool = False
    model_kw: dict = field(default_factory=dict)
    keep_cpu_memory: bool = True  # fluxtrain only: the trainer's default; False keeps glibc's malloc defaults
    cpp_wrapper: bool = True  # compiled only: train.compile_cpp_wrapper, on by default for CPU
    trainer_step: bool = False  # fluxtrain only: the trainer's own `train_step` instead of the shared step below
    batch_threads: int = 1  # fluxtrain only: train.batch_threads, the batch split over threads of one torch thread
    precision: str = "fp32"  # train.precision; bf16 runs the forward under CPU autocast, the trainer's


@dataclass
class Variant:
    spec: Spec
    tokens_per_step: int
    flops_per_token: int
    n_params: int
    conn: Connection
    process: mp.process.BaseProcess
    rates: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, steps: int) -> float:
        """Seconds for `steps` training steps, run in the variant's process while the others wait."""
        self.conn.send(steps)
        return receive(self.conn, self.name)


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    batch: int,
    seq_len: int,
    threads: BatchThreads | None = None,
    precision: str = "fp32",
):
    """One training step as the trainer runs it: batch, forward, backward, clip, step, zero_grad, loss.item().
    With `threads`, the forward and backward of the batch's parts run on them (train.batch_threads); the forward
    runs under the trainer's autocast for `precision`."""
    generator = torch.Generator().manual_seed(0)
    params = [p for p in model.parameters()]
    autocast = functools.partial(autocast_context, torch.device("cpu"), precision)

    def step() -> float:
        starts = torch.randint(len(data) - seq_len, (batch,), generator=generator)
        window = data[starts[:, None] + torch.arange(seq_len + 1)]
        x, y = window[:, :-1], window[:, 1:]
        if threads:
            loss = threads.forward_backward(model, params, x, y, 1.0, autocast)
        else:
            with autocast():
                _, loss = model(x, y)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def make_trainer_step(
    model: nn.Module,
    optimizer,
    data: torch.Tensor,
    batch: int,
    seq_len: int,
    threads: BatchThreads | None = None,
    precision: str = "fp32",
):
    """The step of `fluxtrain.train`: its batches (`TokenData.get_batch`), `train_step` (autocast, a no-op in fp32,
    loss scaling, a no-op on CPU, clipping at 1.0) and the loss read back after each step, as its loop does on CPU."""
    ids = data.numpy().astype("uint16")
    token_data = TokenData(ids, ids[:1000], seq_len, "bench", 1000)
    n_threads, cpu = threads.n if threads else 1, torch.device("cpu")
    tcfg = TrainConfig(batch_size=batch, batch_threads=n_threads, precision=precision)
    scaler, generator = grad_scaler(cpu, tcfg.precision), torch.Generator().manual_seed(0)

    def step() -> float:
        return train_step(model, optimizer, scaler, token_data, generator, World(), cpu, tcfg, 1.0, threads).item()

    return step


def build(spec: Spec, data: torch.Tensor):
    """The variant's training step, tokens per step, FLOPs per token and parameter count."""
    if spec.kind == "plain":
        s = spec.shape
        model = MiniGPT(VOCAB, s["d_model"], s["n_heads"], s["n_layers"], s["ff_dim"], s["seq_len"])
        n = sum(p.numel() for p in model.parameters())
        step = make_step(model, mini_optimizer(model), data, spec.batch, s["seq_len"], precision=spec.precision)
        cfg = ModelConfig(**s)
    else:
        cfg = ModelConfig(dropout=0.0, **spec.shape, **spec.model_kw)
        model = GPT(cfg, VOCAB)
        optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, betas=[0.9, 0.99], weight_decay=0.1))
        n = model.num_params()
        if spec.compile:  # compiled at the first step: with batch threads, single-threaded for one part
            model = torch.compile(model, options={"cpp_wrapper": True} if spec.cpp_wrapper else None)
        threads = BatchThreads(spec.batch_threads) if spec.batch_threads > 1 else None
        if spec.trainer_step:
            step = make_trainer_step(model, optimizer, data, spec.batch, cfg.seq_len, threads, spec.precision)
        else:
            step = make_step(model, optimizer, data, spec.batch, cfg.seq_len, threads, spec.precision)
    return step, spec.batch * cfg.seq_len, flops_per_token(cfg, n), n


def worker(spec: Spec, threads: int, conn: Connection) -> None:
    """A variant's process: plain PyTorch keeps the process defaults; fluxtrain sets the process up as its trainer
    does (`fluxtrain.host.configure`: threads, malloc keeping freed memory). Then it runs the steps it is sent."""
    if spec.kind == "fluxtrain":
        host.configure(threads, spec.keep_cpu_memory)
    elif threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, tokens_per_step, fpt, n = build(spec, torch.randint(VOCAB, (200_000,)))
    conn.send((tokens_per_step, fpt, n))
    while (steps := conn.recv()) is not None:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        conn.send(time.perf_counter() - t0)


def start(specs: list[Spec], threads: int) -> list[Variant]:
    """One process per variant (spawned: nothing shared, not even malloc's state), built in turn."""
    ctx = mp.get_context("spawn")
    variants = []
    for spec in specs:
        conn, child = ctx.Pipe()
        process = ctx.Process(target=worker, args=(spec, threads, child), daemon=True)
        process.start()
        child.close()  # the worker holds the only other end: its death ends the pipe instead of hanging
        variants.append(Variant(spec, *receive(conn, spec.name), conn=conn, process=process))
    return variants


def receive(conn: Connection, name: str):
    try:
        return conn.recv()
    except EOFError:
        sys.exit(f"variant {name!r}: its process died (its error is printed above)")


def stop(variants: list[Variant]) -> None:
    for v in variants:
        v.conn.send(None)
    for v in variants:
        v.process.join()


def measure(variants: list[Variant], windows: int, window_steps: int, warmup_steps: int) -> None:
    """Warm each variant up, then time windows of `window_steps` steps, round robin over the variants."""
    for v in variants:
        print(f"  warmed up {v.name} ({v.run(warmup_steps):.1f}s)", flush=True)
    for _ in range(windows):
        for v in variants:
            v.rates.append(window_steps * v.tokens_per_step / v.run(window_steps))


def print_table(title: str, variants: list[Variant], peaks: dict[str, float], baseline: Variant | None) -> None:
    """tokens/s: the median over windows. MFU: against the matmul peak of the variant's precision (`peaks`).
    vs baseline: the median over rounds of the ratio within each round, which a drift of the machine's speed between
    rounds does not move."""
    width = max(len(v.name) for v in variants)
    print(f"\n{title}")
    print(f"| {'variant':<{width}} | params | tokens/s (median) | spread (min-max) | MFU | vs baseline |")
    print(f"|{'-' * (width + 2)}|-------:|------------------:|-----------------:|----:|------------:|")
    for v in variants:
        med = statistics.median(v.rates)
        mfu = med * v.flops_per_token / peaks[v.spec.precision]
        ratio = "-"
        if baseline:
            ratio = f"{statistics.median(r / b for r, b in zip(v.rates, baseline.rates, strict=True)):.2f}x"
        print(
            f"| {v.name:<{width}} | {v.n_params / 1e6:.2f}M | {med:>17,.0f} "
            f"| {min(v.rates):>7,.0f}-{max(v.rates):<7,.0f} | {100 * mfu:.1f}% | {ratio:>11} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=25, help="timed windows (rounds) per variant")
    parser.add_argument("--window-steps", type=int, default=8, help="training steps per window")
    parser.add_argument("--warmup-steps", type=int, default=15, help="untimed steps first (compile happens here)")
    parser.add_argument("--presets", default="small,medium,large", help="comma list of presets, or 'none'")
    parser.add_argument("--preset-windows", type=int, default=3, help="timed windows per preset variant")
    parser.add_argument("--preset-window-steps", type=int, default=5, help="training steps per preset window")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variants")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--batch-threads", type=int, default=host.max_threads(), help="train.batch_threads of its rows (1: no rows)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    peak = matmul_peak_flops()
    peaks = {"fp32": peak, "bf16": matmul_peak_flops(dtype=torch.bfloat16)}
    print(
        f"torch {torch.__version__} | {torch.get_num_threads()} threads | matmul peak {peak / 1e9:.1f} GFLOP/s fp32, "
        f"{peaks['bf16'] / 1e9:.1f} GFLOP/s bf16"
    )

    shape, batch = REFERENCE, REFERENCE_BATCH
    # The reference recipe's model has no biases, as the plain baseline; fluxtrain's default blocks have them.
    no_bias, rope = dict(bias=False), dict(pos_emb="rope", bias=False)
    flux = functools.partial(Spec, kind="fluxtrain", shape=shape, batch=batch)
    specs = [
        Spec("plain PyTorch minimal GPT, eager", "plain", shape, batch),
        flux("fluxtrain, no bias, eager", model_kw=no_bias),
        flux("fluxtrain, no bias, eager, malloc defaults", model_kw=no_bias, keep_cpu_memory=False),
        flux("fluxtrain, default blocks, eager"),
        flux("fluxtrain, rope, no bias, eager", model_kw=rope),
    ]
    if not args.no_compile:
        specs += [
            flux("fluxtrain, no bias, compiled", compile=True, model_kw=no_bias),
            flux("fluxtrain, no bias, compiled, Python wrapper", compile=True, model_kw=no_bias, cpp_wrapper=False),
            flux(
                "fluxtrain, no bias, compiled, malloc defaults", compile=True, model_kw=no_bias, keep_cpu_memory=False
            ),
            flux("fluxtrain, rope, no bias, compiled", compile=True, model_kw=rope),
            flux("fluxtrain, no bias, compiled, the trainer's step", compile=True, model_kw=no_bias, trainer_step=True),
        ]
    if not args.no_bf16:
        bf16 = dict(model_kw=no_bias, precision="bf16")
        specs += [
            Spec("plain PyTorch minimal GPT, eager, bf16 autocast", "plain", shape, batch, precision="bf16"),
            flux("fluxtrain, no bias, eager, bf16 autocast", **bf16),
        ]
        if not args.no_compile:
            specs += [
                flux("fluxtrain, no bias, compiled, bf16 autocast", compile=True, **bf16),
                flux(
                    "fluxtrain, no bias, compiled, the trainer's step, bf16 autocast",
                    compile=True,
                    trainer_step=True,
                    **bf16,
                ),
            ]
    bt = args.batch_threads
    if bt > 1:
        specs += [flux(f"fluxtrain, no bias, eager, {bt} batch threads", model_kw=no_bias, batch_threads=bt)]
        if not args.no_compile:
            specs += [
                flux(
                    f"fluxtrain, no bias, compiled, {bt} batch threads",
                    compile=True,
                    model_kw=no_bias,
                    batch_threads=bt,
                ),
                flux(
                    f"fluxtrain, no bias, compiled, the trainer's step, {bt} batch threads",
                    compile=True,
                    model_kw=no_bias,
                    trainer_step=True,
                    batch_threads=bt,
                ),
            ]
    print(f"reference shape {shape}, batch {batch}:")
    ref = start(specs, args.threads)
    measure(ref, args.windows, args.window_steps, args.warmup_steps)
    stop(ref)
    print_table(f"Reference shape (batch {batch})", ref, peaks, ref[0])

    presets = [] if args.presets == "none" else args.presets.split(",")
    rows = []
    for preset in presets:
        specs = [Spec(f"{preset}, eager", "fluxtrain", PRESETS[preset], PRESET_BATCH)]
        if not args.no_compile:
            specs.append(Spec(f"{preset}, compiled", "fluxtrain", PRESETS[preset], PRESET_BATCH, compile=True))
            if bt > 1:
                name = f"{preset}, compiled, {bt} batch threads"
                specs.append(Spec(name, "fluxtrain", PRESETS[preset], PRESET_BATCH, compile=True, batch_threads=bt))
            if not args.no_bf16:
                name = f"{preset}, compiled, bf16 autocast"
                specs.append(Spec(name, "fluxtrain", PRESETS[preset], PRESET_BATCH, compile=True, precision="bf16"))
        print(f"preset {preset}:", flush=True)
        variants = start(specs, args.threads)
        measure(variants, args.preset_windows, args.preset_window_steps, 3)
        stop(variants)
        rows += variants
    if rows:
        print_table(f"Presets (batch {PRESET_BATCH})", rows, peaks, None)
    peak_after = matmul_peak_flops()
    drift = abs(peak_after - peak) / peak
    print(f"\nmatmul peak after: {peak_after / 1e9:.1f} GFLOP/s ({100 * drift:.0f}% drift during the run)")
    if not math.isfinite(drift):
        sys.exit(1)


if __name__ == "__main__":
    main()
