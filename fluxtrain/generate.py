"""`python -m fluxtrain.generate` (`fluxtrain-generate`): load a model and write text from a prompt or interactively."""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import TextIO

import torch

from fluxtrain import host
from fluxtrain.data import encode_text
from fluxtrain.errors import (
    FluxtrainError,
    OneLineErrorParser,
    OutputError,
    discard_stdout,
    first_line,
    generation_out_of_memory_message,
    is_out_of_memory,
    paths_named,
)
from fluxtrain.host import resolve_device, use_threads
from fluxtrain.logs import CONTROL_ESCAPES
from fluxtrain.model import GPT
from fluxtrain.model_file import load_model
from fluxtrain.quantize import QUANTIZE_CHOICES, apply_quantization
from fluxtrain.runs import resolve_model_path
from fluxtrain.sampling import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    BeamStream,
    SamplingConfig,
    check_seed,
    compile_decoding,
    sample_stream,
    start_ids,
)
from fluxtrain.sampling import generate_ids as generate_ids  # re-exported: the name callers know from here
from fluxtrain.tokenizer import Tokenizer, UnknownCharactersError, load_tokenizer


def load_for_generation(
    name: str | Path, tokenizer_path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer, Path]:
    """The model and tokenizer named on the command line, and the file they came from."""
    if tokenizer_path is not None and not str(tokenizer_path).strip():  # most likely an unset shell variable
        raise FluxtrainError("TOKENIZER is empty (give a tokenizer file, or leave it out for the model's own)")
    try:
        path = resolve_model_path(name)
    except OSError as e:  # a name too long, a folder that cannot be listed
        raise FluxtrainError(f"MODEL {name} cannot be read: {e.strerror or first_line(e)}") from None
    model, tokenizer = load_model(path, device)
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path, setting="TOKENIZER")
        if tokenizer.vocab_size != model.vocab_size:
            raise FluxtrainError(
                f"TOKENIZER {tokenizer_path} has {tokenizer.vocab_size} tokens, the model in {path} "
                f"was trained with {model.vocab_size}"
            )
    return model, tokenizer, path


def encode_prompt(tokenizer: Tokenizer, text: str, drop_unknown: bool) -> tuple[str, list[int], str]:
    """The prompt text as the model sees it, its token ids, and a line for stderr about the characters the tokenizer
    has no token for ("" where there are none).

    Such characters are an error naming them, or where the tokenizer reads them as its unknown token a warning; with
    `drop_unknown` they are left out.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable bytes from the command line or stdin arrive as lone surrogates
        raise FluxtrainError(f"the prompt is not valid UTF-8 (character {e.start + 1} is a bad byte)") from None
    if unknown := tokenizer.unknown_chars(text):
        if not drop_unknown:
            raise FluxtrainError(f"the prompt has {UnknownCharactersError(unknown)} (--drop-unknown leaves them out)")
    else:
        ids = encode_text(tokenizer, text)
        token, unknown = read_as_unknown(tokenizer, text, ids)
        if not unknown:
            return text, ids, ""
        if not drop_unknown:
            names = ", ".join(map(repr, unknown))
            note = f"{len(unknown)} prompt character(s) are not in the vocabulary and read as {token}: {names}"
            return text, ids, note + " (--drop-unknown leaves them out)"
    kept = text.translate(dict.fromkeys(map(ord, unknown)))
    return kept, encode_text(tokenizer, kept), f"left out of the prompt: {', '.join(map(repr, unknown))}"


def read_as_unknown(tokenizer: Tokenizer, text: str, ids: list[int]) -> tuple[str, list[str]]:
    """The unknown token of a tokenizer that has one, and the characters of `text` (encoded as `ids`) that it reads
    as that token, each on its own; ("", []) where none."""
    unk_id = tokenizer.unk_id
    if unk_id is None or unk_id not in ids:
        return "", []
    return tokenizer.hf.id_to_token(unk_id), sorted(c for c in set(text) if unk_id in tokenizer.encode(c))


class TextStream:
    """Turns token ids, one at a time, into printable pieces of text.

    A token can be part of a character, or change how the token before it decodes (a decoder that drops a leading
    space at the start of the text), so each piece is the text of the ids not yet printed decoded together with
    the last printed piece's ids, less that piece's text; a piece that ends in an incomplete character is held back.
    Each token costs the decoding of a few ids, however long the line. `context`: ids printed before the first
    token (the prompt's last ones), that it is decoded after.
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] | None = None):
        self.tokenizer = tokenizer
        self.context = list(context or [])  # the ids of the last printed piece
        self.context_text = tokenizer.decode(self.context) if self.context else ""  # their text, decoded alone
        self.pending: list[int] = []  # ids not printed yet

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.context + self.pending)
        if text.endswith("\ufffd") or len(text) <= len(self.context_text):
            return ""
        piece = text[len(self.context_text) :]
        self.context, self.pending = self.pending, []
        self.context_text = self.tokenizer.decode(self.context)
        return piece

    def flush(self) -> str:
        """What is still held back, at the end of the text."""
        piece = self.tokenizer.decode(self.context + self.pending)[len(self.context_text) :]
        self.context, self.context_text, self.pending = [], "", []
        return piece


def printed_context(tokenizer: Tokenizer, text: str, ids: list[int]) -> list[int]:
    """The prompt's last ids, as few as decode to the end of its printed `text` (whole characters), else all of them:
    the new text is decoded after them, as after the whole prompt (a SentencePiece-style decoder drops the space
    before a text's first word, which the first new word has after a prompt)."""
    for n in range(1, min(len(ids), 8) + 1):  # a character is at most 4 byte tokens
        end = tokenizer.decode(ids[-n:])
        if end and text.endswith(end):
            return ids[-n:]
    return ids


class ContinuationWriter:
    """Writes new token ids to `out` as text, decoded after the printed `context` ids: each as it comes when
    streaming, else all at the end."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO, stream: bool, context: list[int]):
        self.out = out
        self.stream = stream
        self.text = TextStream(tokenizer, context)
        self.ids: list[int] = []  # those added so far

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self.stream:
            self.out.write(self.text.push(token))
            self.out.flush()

    def finish(self, ids: list[int]) -> None:
        """Write the rest of the continuation `ids`: the ids added and any after them."""
        start = len(self.ids) if self.stream else 0  # those written so far
        self.out.write("".join(self.text.push(token) for token in ids[start:]) + self.text.flush())
        self.out.flush()


def write_continuation(
    model: GPT,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    generator: torch.Generator,
    out: TextIO,
    stream: bool,
    prompt_text: str,
) -> None:
    """Generate after `prompt_ids` (after `start_ids` where there are none) and write the new text to `out`, as it
    reads after `prompt_text`, printed already: token by token when streaming (with beams, each token once every beam
    holds it), else at the end. Ctrl-C (KeyboardInterrupt) stops generating: the text so far (with beams, the best
    beam so far) is written, and the KeyboardInterrupt goes on."""
    context = printed_context(tokenizer, prompt_text, prompt_ids)
    prompt_ids = prompt_ids or start_ids(tokenizer)
    beams = BeamStream(model, prompt_ids, cfg) if cfg.beams > 1 else None
    tokens = beams if beams is not None else sample_stream(model, prompt_ids, cfg, generator)
    writer = ContinuationWriter(tokenizer, out, stream, context)
    try:
        for token in tokens:
            writer.add(token)
    except KeyboardInterrupt:
        writer.finish(beams.best if beams is not None else writer.ids)
        raise
    writer.finish(writer.ids)


class EscapedControls:
    """A text stream that writes control characters as escapes (ESC as `\\x1b`), so that text from a model cannot
    change the state of the terminal that shows it."""

    def __init__(self, out: TextIO):
        self.out = out

    def write(self, text: str) -> int:
        return self.out.write(text.translate(CONTROL_ESCAPES))

    def flush(self) -> None:
        self.out.flush()


def for_display(out: TextIO) -> TextIO:
    """`out` for the text: with control characters escaped on a terminal, as it is in a pipe or file."""
    try:
        terminal = out.isatty()
    except ValueError:  # closed
        terminal = False
    return EscapedControls(out) if terminal else out


def describe(
    path: Path, model: GPT, device: torch.device, cfg: SamplingConfig, seed: int, n_params: int, quantize: str = "none"
) -> str:
    settings = asdict(cfg) | {"context_shift": cfg.shift_for(model.cfg.seq_len)}
    shown = ", ".join(f"{k.replace('top_', 'top-').replace('_', ' ')} {v}" for k, v in settings.items())
    weights = " (int8 weights)" if quantize == "int8" else ""
    seed_text = "no seed (deterministic)" if cfg.deterministic else f"seed {seed}"
    return (
        f"model {path}: {n_params:,} parameters{weights}, context {model.cfg.seq_len}, vocab {model.vocab_size}"
        f" | device {device} | {shown} | {seed_text}"
    )


class GenerateParser(OneLineErrorParser):
    def explain(self, message: str) -> str:
        if message == "argument --prompt: expected one argument":  # also `--prompt -x`: -x looks like an option
            message += "; a prompt that starts with '-' goes as --prompt=-..."
        return message


def build_parser() -> argparse.ArgumentParser:
    defaults = SamplingConfig()
    p = GenerateParser(
        prog="fluxtrain-generate",
        description="Write text with a trained model: once from a prompt, from stdin, or in an interactive session.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a model file (.safetensors), a checkpoint (.ckpt), or a run folder (best, else final, else newest .ckpt)",
    )
    p.add_argument("tokenizer", metavar="TOKENIZER", nargs="?", help="a tokenizer file (default: the model's own)")
    p.add_argument("--prompt", help="text to continue; without it: interactive on a terminal, else stdin")
    p.add_argument("--interactive", action="store_true", help="an interactive session (the default on a terminal)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, metavar="N", help="default: 500")
    p.add_argument(
        "--temperature",
        type=float,
        default=defaults.temperature,
        metavar="T",
        help=f"0-{MAX_TEMPERATURE:g}, 0 = greedy",
    )
    p.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K", help="0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, metavar="P", help="nucleus mass, 1 = off")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=defaults.repetition_penalty,
        metavar="R",
        help=f"1 to {MAX_REPETITION_PENALTY:g}, 1 = off",
    )
    p.add_argument("--beams", type=int, default=defaults.beams, metavar="B", help="beam search width, 1 = off")
    p.add_argument(
        "--seed", type=int, metavar="S", help="0 to 2**32 - 1, makes sampling reproducible (default: a random seed)"
    )
    p.add_argument("--device", default="auto", metavar="D", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: torch's; 1 is best on a busy CPU)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True, help="print tokens as they come")
    p.add_argument(
        "--context-shift",
        type=int,
        metavar="N",
        help="tokens dropped at once when the context is full (default: context // 4; 1 = exact sliding window)",
    )
    p.add_argument("--drop-unknown", action="store_true", help="leave out prompt characters the tokenizer lacks")
    p.add_argument(
        "--quantize",
        default="none",
        metavar="Q",
        help="none, or int8: int8 weights (one scale per row) for faster decoding on CPU, slightly different logits",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step: tens of seconds at start, then faster tokens (with int8 weights on CPU)",
    )
    return p


# The option that sets each SamplingConfig field (`top_k`: `--top-k`), so that an error names what the user typed.
SAMPLING_OPTIONS = {f.name: "--" + f.name.replace("_", "-") for f in fields(SamplingConfig)}


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    """The decoding settings the options give, one option per field (`SAMPLING_OPTIONS`)."""
    return SamplingConfig(**{name: getattr(args, name) for name in SAMPLING_OPTIONS})


def run(args: argparse.Namespace) -> int:
    cfg = sampling_config(args)
    cfg.validate(names=SAMPLING_OPTIONS)  # all but the context shift's bound, which needs the model, before loading it
    if args.quantize not in QUANTIZE_CHOICES:
        raise FluxtrainError(f"--quantize {args.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    if args.seed is not None:
        check_seed(args.seed, "--seed")
    if args.prompt is not None and args.interactive:
        raise FluxtrainError("--prompt and --interactive exclude each other")
    if sys.stdout is None:
        raise FluxtrainError("stdout is closed: there is nowhere to write the text")
    if args.interactive and sys.stdin is None:
        raise FluxtrainError("--interactive reads prompts from stdin, which is closed")
    use_threads(args.threads, "--threads")
    device = resolve_device(args.device, "--device")
    model, tokenizer, path = load_for_generation(args.model, args.tokenizer, device)
    n_params = model.num_params()
    apply_quantization(model, args.quantize)
    cfg.validate(model.cfg.seq_len, SAMPLING_OPTIONS)
    if args.compile:
        print("compiling the decoding step...", file=sys.stderr, flush=True)
        failure = compile_decoding(model)
        if failure:
            print(f"--compile: torch.compile failed ({failure}); decoding eagerly", file=sys.stderr)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    generator = torch.Generator().manual_seed(seed)
    if args.prompt is None and (args.interactive or stdin_is_terminal()):
        from fluxtrain.interactive import Session

        print(describe(path, model, device, cfg, seed, n_params, args.quantize), file=sys.stderr)
        return Session(model, tokenizer, cfg, seed, args.drop_unknown, args.stream).run()

    text = args.prompt if args.prompt is not None else read_stdin()
    text, ids, note = encode_prompt(tokenizer, text, args.drop_unknown)
    print(describe(path, model, device, cfg, seed, n_params, args.quantize), file=sys.stderr)
    if note:
        print(note, file=sys.stderr)
    return print_continuation(text, model, tokenizer, ids, cfg, generator, args.stream)


def stdin_is_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def read_stdin() -> str:
    """The prompt piped on stdin; a closed stdin, like an empty one, gives an empty prompt."""
    return sys.stdin.read() if sys.stdin is not None else ""


@contextmanager
def writing_text() -> Iterator[None]:
    """An OSError from writing the text to stdout is an OutputError; a reader that has left (BrokenPipeError) stops
    the command quietly, in `main`."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write the text to stdout: {e.strerror or e}") from None


def print_continuation(
    text: str,
    model: GPT,
    tokenizer: Tokenizer,
    ids: list[int],
    cfg: SamplingConfig,
    generator: torch.Generator,
    stream: bool,
) -> int:
    """Write the prompt `text` and its continuation to stdout; the exit status (130: stopped by Ctrl-C)."""
    with writing_text():
        try:
            out = for_display(sys.stdout)
            out.write(text)
            write_continuation(model, tokenizer, ids, cfg, generator, out, stream, text)
            sys.stdout.write("\n")
            sys.stdout.flush()
        except KeyboardInterrupt:  # the text so far is written
            sys.stdout.write("\n")
            print("interrupted", file=sys.stderr)
            return 130
    return 0


def show_unencodable_characters() -> None:
    """Write characters that stdout's encoding lacks (an ASCII or Latin-1 locale) as escapes such as `\\u65e5`,
    as Python does on stderr, instead of stopping at the first one."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def read_bad_bytes_as_escapes() -> None:
    """Read bytes on stdin that are not valid UTF-8 as lone surrogates, as Python hands them over from the command
    line, so that `encode_prompt` names them in one line (and a session goes on) instead of a UnicodeDecodeError."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")


def keep_messages_off_stdout() -> None:
    """With stderr closed (`2>&-`) Python's `sys.stderr` is None, which sends `print(..., file=sys.stderr)` to stdout,
    into the text, and leaves descriptor 2 to the next file opened: /dev/null takes its place."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command, not a call from Python
        host.collect_less()
    keep_messages_off_stdout()
    args = build_parser().parse_args(argv)
    show_unencodable_characters()
    read_bad_bytes_as_escapes()
    try:
        with paths_named():
            return run(args)
    except FluxtrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading or compiling (generation itself stops more gently)
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly
        discard_stdout()
        return 1
    except OutputError as e:
        discard_stdout()
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"\nerror: {generation_out_of_memory_message(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
