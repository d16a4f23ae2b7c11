"""The interactive session of `fluxtrain-generate`: a `> ` prompt with readline editing, history and /commands."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from fluxtrain.errors import FluxtrainError, generation_out_of_memory_message, is_out_of_memory
from fluxtrain.generate import encode_prompt, for_display, write_continuation, writing_text
from fluxtrain.model import GPT
from fluxtrain.sampling import MAX_BEAMS, MAX_REPETITION_PENALTY, MAX_SEED, MAX_TEMPERATURE, SamplingConfig
from fluxtrain.tokenizer import Tokenizer

HISTORY_FILE = Path("~/.fluxtrain_generate_history")
HISTORY_LENGTH = 1000

# command: (SamplingConfig field, value type, name shown, what is allowed)
SETTINGS = {
    "/temp": ("temperature", float, "temperature", f"a temperature from 0 to {MAX_TEMPERATURE:g} (0 = greedy)"),
    "/topk": ("top_k", int, "top-k", "an integer top-k >= 0 (0 = off)"),
    "/topp": ("top_p", float, "top-p", "a top-p in (0, 1] (1 = off)"),
    "/rep": (
        "repetition_penalty",
        float,
        "repetition penalty",
        f"a repetition penalty from 1 to {MAX_REPETITION_PENALTY:g} (1 = off)",
    ),
    "/len": ("max_new_tokens", int, "length", "a number of new tokens >= 1"),
    "/beams": ("beams", int, "beams", f"a number of beams from 1 to {MAX_BEAMS} (1 = sampling, no beam search)"),
}
HELP = f"""commands:
  /temp V    temperature, 0-{MAX_TEMPERATURE:g} (0 = greedy)
  /topk K    keep the K most likely tokens (0 = off)
  /topp P    keep the most likely tokens up to probability mass P (1 = off)
  /rep R     repetition penalty, 1 to {MAX_REPETITION_PENALTY:g} (1 = off)
  /len N     new tokens per prompt
  /seed S    restart the sampler from seed S (an integer from 0 to 2**32 - 1)
  /beams B   beam search with B beams (1 = off, at most {MAX_BEAMS})
  /help      this help and the current settings
  /quit      leave (Ctrl-D does too)
  //text     the prompt /text (a prompt that starts with /)
Anything else is a prompt. Ctrl-C stops a generation, shows the text so far and comes back here."""
PROMPT_ESCAPE = "//"  # a line that starts with it is a prompt, less its first /
PROMPT = "> "


class Session:
    """Reads prompts and commands until /quit or end of input; each prompt is continued on its own."""

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, cfg: SamplingConfig, seed: int, drop_unknown: bool, stream: bool
    ):
        cfg.validate(model.cfg.seq_len)  # each command then changes one setting of a valid config
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.drop_unknown = drop_unknown
        self.stream = stream

    def run(self) -> int:
        if sys.stdin.isatty():
            # Ctrl-C is this session's stop key, also where the process was started with SIGINT ignored (the
            # background jobs of a shell without job control are).
            signal.signal(signal.SIGINT, signal.default_int_handler)
        history = self._start_readline()
        self.say("type a prompt, or /help for commands")
        try:
            while True:
                try:
                    line = read_line()
                except EOFError:  # Ctrl-D
                    print(file=sys.stderr)
                    return 0
                except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
                    print(file=sys.stderr)
                    continue
                if line.lstrip().startswith(PROMPT_ESCAPE):
                    self.generate(line.replace("/", "", 1))
                elif line.lstrip().startswith("/"):
                    if not self.command(line.strip()):
                        return 0
                elif line.strip():
                    self.generate(line)
        finally:
            self._save_history(history)

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def settings(self) -> str:
        c = self.cfg
        return (
            f"temperature {c.temperature}, top-k {c.top_k}, top-p {c.top_p}, repetition penalty "
            f"{c.repetition_penalty}, length {c.max_new_tokens}, beams {c.beams}, seed {self.seed}"
        )

    def command(self, line: str) -> bool:
        """Apply one /command; False means leave the session."""
        name, *rest = line.split(maxsplit=1)
        value = rest[0] if rest else ""
        if name in ("/quit", "/help") and value:
            self.say(f"{name} takes no value: got {_short(value)!r}")
        elif name == "/quit":
            return False
        elif name == "/help":
            self.say(f"{HELP}\nnow: {self.settings()}")
        elif name == "/seed":
            seed = _seed(value)
            if seed is None:
                self.say(f"/seed needs an integer from 0 to 2**32 - 1, got {_short(value)!r}")
            else:
                self.seed = seed
                self.generator.manual_seed(self.seed)
                self.say(f"seed {self.seed}")
        elif name in SETTINGS:
            self.set(name, value)
        else:
            self.say(f"unknown command {_short(name)}; commands: {', '.join([*SETTINGS, '/seed', '/help', '/quit'])}")
        return True

    def set(self, name: str, value: str) -> None:
        field, kind, shown, allowed = SETTINGS[name]
        try:
            if not value.isascii():  # int() and float() read other scripts' digits too: "５"
                raise ValueError(value)
            parsed = kind(value) + kind(0)  # -0 reads as 0
            cfg = replace(self.cfg, **{field: parsed})
            cfg.validate(self.model.cfg.seq_len)
        except ValueError:  # not a number, or one `field` does not allow (FluxtrainError from validate)
            self.say(f"{name} needs {allowed}: got {_short(value)!r}")
            return
        self.cfg = cfg
        self.say(f"{shown} {parsed}")

    def generate(self, line: str) -> None:
        try:
            text, ids, note = encode_prompt(self.tokenizer, line, self.drop_unknown)
        except FluxtrainError as e:
            self.say(str(e))
            return
        if note:
            self.say(note)
        with writing_text():  # a failed write ends the session with a one-line error
            try:
                out = for_display(sys.stdout)
                out.write(text)
                write_continuation(self.model, self.tokenizer, ids, self.cfg, self.generator, out, self.stream, text)
                sys.stdout.write("\n")
            except KeyboardInterrupt:  # the text so far is written
                sys.stdout.write("\n")
                self.say("[stopped]")
            except (RuntimeError, MemoryError) as e:  # the session goes on: a smaller /beams or /len may fit
                if not is_out_of_memory(e):
                    raise
                sys.stdout.write("\n")
                self.say(generation_out_of_memory_message(e, "/beams or /len"))
            sys.stdout.flush()

    def _start_readline(self):
        """Line editing and a history kept across sessions; None where readline is missing, the lines do not come
        from a terminal (a pipe: nothing to edit or recall), or there is no history file (no home folder, or
        something else than a file in its place)."""
        if not sys.stdin.isatty():
            return None
        try:
            import readline
        except ImportError:
            return None
        try:
            path = HISTORY_FILE.expanduser()
            if path.exists() and not path.is_file():  # reading a FIFO waits for a writer, a device may never end
                return None
        except (RuntimeError, OSError):  # no home folder (HOME unset for a uid without a passwd entry), no access
            return None
        try:
            readline.read_history_file(path)
        except OSError:
            pass
        readline.set_history_length(HISTORY_LENGTH)
        return readline, path

    @staticmethod
    def _save_history(history) -> None:
        if history is None:
            return
        readline, path = history
        try:
            readline.write_history_file(path)
        except OSError:
            pass


def _seed(value: str) -> int | None:
    """The seed `value` writes in digits, None where it is no integer from 0 to 2**32 - 1."""
    digits = value.lstrip("0") or "0"  # int() reads at most 4300 digits
    if value.isascii() and value.isdigit() and len(digits) <= len(str(MAX_SEED)) and int(digits) <= MAX_SEED:
        return int(digits)
    return None


def _short(value: str, limit: int = 40) -> str:
    """`value`, cut to `limit` characters and … where it is longer (a line of 5,000 digits)."""
    return value if len(value) <= limit else value[:limit] + "…"


def read_line() -> str:
    """A line of input after the prompt, which goes to stderr, as Python's own does, so that stdout holds only the
    text. input() edits the line with readline, and shows the prompt, only where stdout is a terminal: while the
    line is typed on a terminal, stdout is stderr's (`> file` still has line editing and history)."""
    if not (_terminal(sys.stdin) and _terminal(sys.stderr) and _descriptor(sys.stdout) == 1):
        sys.stderr.write(PROMPT)
        sys.stderr.flush()
        return input()
    with _stdout_on_stderr():
        return input(PROMPT)


@contextmanager
def _stdout_on_stderr() -> Iterator[None]:
    """Descriptor 1 writes where stderr does (unless it is that terminal already), and then back where it did."""
    stdout, stderr = os.fstat(1), os.fstat(sys.stderr.fileno())
    if os.path.samestat(stdout, stderr):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(sys.stderr.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # None, or closed
        return False


def _descriptor(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # None, closed, or no file (captured in a test)
        return None
