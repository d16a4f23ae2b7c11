"""Measure a model file on any text: loss, perplexity and bits per byte over full-context windows, with a CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import numbers
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fluxtrain import host
from fluxtrain.data import ENCODING_ERRORS, ByteCount, encode_all
from fluxtrain.errors import FluxtrainError, OneLineErrorParser, paths_named, quiet_when_stdout_closes
from fluxtrain.files import atomic_write_text, check_writable, parse_json
from fluxtrain.host import resolve_device, use_threads
from fluxtrain.model import GPT, eval_mode
from fluxtrain.model_file import load_model
from fluxtrain.runs import model_file_label, resolve_model_path, saved_iteration
from fluxtrain.sources import iter_text, resolve_sources
from fluxtrain.tokenizer import Tokenizer, check_ids


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy, nats per scored token
    perplexity: float
    bits_per_byte: float
    n_tokens: int  # tokens in the text
    n_scored: int  # tokens predicted (all but the first)
    n_bytes: int  # UTF-8 bytes of the text
    seq_len: int
    stride: int


def perplexity(loss: float) -> float:
    """exp(loss in nats per token), capped at exp(50) so a diverged loss stays a finite number."""
    return math.exp(min(loss, 50.0))


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Nats per token -> bits per token, divided by the text's mean bytes per token: comparable across tokenizers."""
    return loss / math.log(2) / bytes_per_token


def check_stride(stride: int | None, seq_len: int) -> int:
    """The stride to use: `seq_len` when None; an error naming --stride when it is out of range."""
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise FluxtrainError(f"--stride={stride} must be between 1 and the model's seq_len={seq_len}")
    return stride


def plan_windows(n_ids: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int]]:
    """`iter_windows` as a list."""
    return list(iter_windows(n_ids, seq_len, stride))


def count_windows(n_ids: int, seq_len: int, stride: int | None = None) -> int:
    """How many windows `iter_windows` gives (n_ids >= 2): the first, then one per `stride` tokens after it."""
    stride = check_stride(stride, seq_len)
    return 1 + max(0, -(-(n_ids - 1 - seq_len) // stride))


def iter_windows(n_ids: int, seq_len: int, stride: int | None = None) -> Iterator[tuple[int, int]]:
    """Windows over `n_ids` tokens as (start, n_scored): inputs ids[start : start + seq_len] predict the next ids.

    Only the last `n_scored` predictions of a window count, so every token after the first is scored exactly once.
    With `stride == seq_len` (the default) the windows do not overlap; a smaller stride slides each window by
    `stride` tokens, so every scored token after the first window sees at least `seq_len - stride` tokens of context.
    The last window is moved back to end at the last token, keeping its full context. A text shorter than
    `seq_len + 1` tokens is one shorter window.
    """
    stride = check_stride(stride, seq_len)
    if n_ids < 2:
        raise FluxtrainError(f"the text has {n_ids} token(s); evaluation needs at least 2")
    return _windows(n_ids - 1, seq_len, stride)


def _windows(n_targets: int, seq_len: int, stride: int) -> Iterator[tuple[int, int]]:
    if n_targets <= seq_len:
        yield 0, n_targets
        return
    start, scored_end = 0, seq_len  # targets 1..scored_end are scored
    yield start, seq_len
    while scored_end < n_targets:
        start = min(start + stride, n_targets - seq_len)
        yield start, start + seq_len - scored_end
        scored_end = start + seq_len


@torch.no_grad()
def window_losses(
    model: GPT,
    ids: torch.Tensor,
    windows: Iterable[tuple[int, int]],
    batch_size: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
    n_windows: int | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy (nats) of the scored tokens of `windows` (`n_windows` of them, for the progress bar)
    over `ids` (1-D), and how many were scored."""
    if batch_size <= 0:
        raise FluxtrainError(f"--batch-size={batch_size} must be a positive integer")
    length = min(model.cfg.seq_len, len(ids) - 1)
    offsets = torch.arange(length + 1)
    total, n_scored = 0.0, 0
    windows = iter(windows)  # read as they go: at stride 1 there is one per token
    batches = iter(lambda: list(itertools.islice(windows, batch_size)), [])
    n_batches = None if n_windows is None else -(-n_windows // batch_size)
    with eval_mode(model):
        for chunk in tqdm(batches, total=n_batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
            starts = torch.tensor([start for start, _ in chunk])
            window = ids[starts[:, None] + offsets].long()  # (B, T + 1)
            x, y = window[:, :-1].to(device), window[:, 1:].to(device)
            logits, _ = model(x)  # (B, T, vocab)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape)
            # Score only the last n_scored positions of each window.
            n = torch.tensor([k for _, k in chunk], device=device)
            scored = torch.arange(length, device=device)[None, :] >= (length - n)[:, None]  # (B, T)
            total += losses[scored].double().sum().item()
            n_scored += int(scored.sum())
    return total, n_scored


def evaluate_ids(
    model: GPT,
    ids: np.ndarray | list[int],
    n_bytes: int,
    stride: int | None = None,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on token ids that stand for `n_bytes` bytes of text, computed on
    `device` (by default the model's)."""
    check_ids(ids, model.vocab_size)
    if not (isinstance(n_bytes, numbers.Integral) and not isinstance(n_bytes, (bool, np.bool_)) and n_bytes > 0):
        raise FluxtrainError(f"n_bytes={n_bytes!r} must be the positive number of bytes of text the ids stand for")
    ids = torch.from_numpy(np.asarray(ids, dtype=np.int32))  # ids of up to 2**31 tokens: half of int64's memory
    device = model.tok_emb.weight.device if device is None else device
    seq_len = model.cfg.seq_len
    windows = iter_windows(len(ids), seq_len, stride)
    n_windows = count_windows(len(ids), seq_len, stride)
    total, n_scored = window_losses(model, ids, windows, batch_size, device, progress, n_windows)
    loss = total / n_scored
    return EvalResult(
        loss=loss,
        perplexity=perplexity(loss),
        bits_per_byte=bits_per_byte(loss, n_bytes / len(ids)),
        n_tokens=len(ids),
        n_scored=n_scored,
        n_bytes=n_bytes,
        seq_len=seq_len,
        stride=seq_len if stride is None else stride,
    )


def evaluate_text(model: GPT, tokenizer: Tokenizer, text: str, **kwargs) -> EvalResult:
    """`evaluate_ids` on a string, encoded with the model's tokenizer; keyword arguments go to `evaluate_ids`."""
    return evaluate_ids(model, tokenizer.encode(text), len(text.encode("utf-8")), **kwargs)


class UnknownDropped:
    """Leaves out of text pieces the characters the tokenizer has no id for (a character tokenizer's, or a learned one's
    without byte fallback or an unknown token), counting them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.counts = tokenizer, Counter()

    def through(self, pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            if unknown := set(self.tokenizer.unknown_chars(piece)):
                self.counts.update(c for c in piece if c in unknown)
                piece = piece.translate(dict.fromkeys(map(ord, unknown)))
            yield piece


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineErrorParser(
        prog="python -m fluxtrain.evaluate",
        description="Loss (nats/token), perplexity and bits per byte of a model file on a text file or folder.",
    )
    p.add_argument("model", help="a model file (.safetensors), a checkpoint (.ckpt) or a run folder (its best model)")
    p.add_argument("--data", required=True, help="a UTF-8 text file, a folder or a glob (quoted)")
    p.add_argument(
        "--encoding-errors",
        choices=ENCODING_ERRORS,
        default="strict",
        help="bytes that are not UTF-8: an error (strict, the default), or read as U+FFFD with a warning (replace)",
    )
    p.add_argument(
        "--drop-unknown", action="store_true", help="leave out characters the tokenizer lacks, instead of an error"
    )
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (default 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's; 1 is best on a busy CPU)")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="slide windows by this many tokens (1..seq_len); default seq_len: non-overlapping windows",
    )
    p.add_argument(
        "--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH ('-': stdout, alone)"
    )
    return p.parse_args(argv)


FIGURE_KEYS = {"model", "data", "loss"}  # in every --json file this command writes


MAX_JSON_BYTES = 1 << 20


def check_json_target(path: str) -> None:
    """`--json PATH` may replace an earlier evaluation's JSON, never another file (the model, the text, ...)."""
    check_writable(path, "--json")
    target = Path(path).expanduser()
    if not target.exists():
        return
    if not target.is_file():  # a device or a pipe: reading it to check could take forever, or all the memory
        raise FluxtrainError(f"--json {path} is not a regular file: give a file to write the figures to, or -")
    try:
        # An evaluation's JSON is a few hundred bytes: a large file is another one, and is not read whole to see that.
        earlier = parse_json(target.read_bytes()) if target.stat().st_size <= MAX_JSON_BYTES else None
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and FIGURE_KEYS <= earlier.keys()):
        raise FluxtrainError(
            f"--json {path} is a file that no evaluation wrote: not replaced (give a new file, or remove it first)"
        )


def run(args: argparse.Namespace) -> EvalResult:
    if args.batch_size <= 0:
        raise FluxtrainError(f"--batch-size={args.batch_size} must be a positive integer")
    if not args.data.strip():
        raise FluxtrainError("--data is empty; give a text file, a folder or a glob")
    if args.json is not None and not args.json.strip():
        raise FluxtrainError("--json is empty; give a file to write the figures to, or - for stdout")
    if args.json and args.json != "-":
        check_json_target(args.json)
    device = resolve_device(args.device, "--device")
    use_threads(args.threads, "--threads")
    path = resolve_model_path(args.model)  # a run folder's best model, else its final one, ...
    model, tokenizer = load_model(path, device)
    iteration = saved_iteration(path)
    check_stride(args.stride, model.cfg.seq_len)
    sources = resolve_sources(args.data, setting="--data", run_folders=True)  # as data.path: no run's logs
    text = ByteCount()  # the bytes of the text as read, as evaluate_text counts them (not a normalizer's output)
    pieces = iter_text(sources, encoding_errors=args.encoding_errors)
    dropped = UnknownDropped(tokenizer)
    hint = "; --drop-unknown leaves them out" if tokenizer.may_lack_chars and not args.drop_unknown else ""
    ids = encode_all(
        text.through(dropped.through(pieces) if args.drop_unknown else pieces),
        tokenizer,
        sources.setting,
        f"the model {args.model}{hint}",
    )
    if dropped.counts:
        shown = ", ".join(f"{c!r} x{n:,}" for c, n in dropped.counts.most_common(20))
        print(f"left out of the text, which the figures are over: {shown}", file=sys.stderr)
    if len(ids) < 2:
        kept = " once --drop-unknown left characters out" if dropped.counts else ""
        raise FluxtrainError(f"{sources.setting}: the text is {len(ids)} token(s){kept}; evaluation needs at least 2")
    result = evaluate_ids(model, ids, text.n, args.stride, args.batch_size, device, sys.stderr.isatty())
    summary = sys.stderr if args.json == "-" else sys.stdout  # stdout is then the JSON alone, for a pipe
    print(
        f"{model_file_label(path, iteration)} | {sources.describe()} | {result.n_tokens:,} {tokenizer.name} tokens "
        f"| seq_len {result.seq_len}, stride {result.stride}",
        file=summary,
    )
    print(
        f"loss {result.loss:.4f} nats/token | perplexity {result.perplexity:.3f} "
        f"| bits per byte {result.bits_per_byte:.4f} (over {result.n_bytes:,} bytes of text "
        f"{'kept' if dropped.counts else 'as read'})",
        file=summary,
    )
    if args.json:
        names = {"model": str(args.model), "model_file": str(path), "iteration": iteration}
        figures = json.dumps({**names, "data": str(args.data), **asdict(result)}, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(figures)
        else:
            try:
                atomic_write_text(args.json, figures)
            except OSError as e:
                raise FluxtrainError(f"--json {args.json} cannot be written: {e.strerror or e}") from None
    return result


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # the command, not a call from Python
        host.collect_less()
    try:
        with paths_named(), quiet_when_stdout_closes():
            run(parse_args(argv))
    except FluxtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
