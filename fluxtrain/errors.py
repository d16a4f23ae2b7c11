"""How mistakes and failures reach the user in one line: the exception type for user mistakes (printed without a
traceback), the wording of OS errors, paths and running out of memory, commands whose reader stops early (`| head`),
and an argument parser whose errors are one line."""

import argparse
import difflib
import io
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path


class FluxtrainError(ValueError):
    """Bad input from the user (a setting, a file or a prompt), or a run that cannot go on (a diverged loss, a stop
    on a signal): the message names the problem and what to change."""

    reported = False  # printed already (by this rank before it told the others, or by another rank)


class OutputError(Exception):
    """stdout refused the text (a full disk, a terminal gone). Here, not in fluxtrain.generate, which runs as
    `__main__` under `python -m` and would then define a second class that the session's errors are not of."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def did_you_mean(value: object, choices: Iterable[str], form: str = "{}") -> str:
    """` (did you mean X?)`, X the choice closest to `value` written as `form` formats it, or "" when none is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {form.format(close[0])}?)" if close else ""


def describe_failure(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` (at most `limit` characters, cut after a word where one ends near the
    limit, marked "..."), for a one-line note about a failed attempt."""
    message = first_line(e)
    if len(message) > limit:
        cut = message.rfind(" ", 0, limit)
        message = message[: cut if cut > limit * 3 // 4 else limit].rstrip(" ,;:(") + "..."
    return f"{type(e).__name__}: {message}"


def expand_home(path: str | Path, named: str) -> Path:
    """`path` with a leading `~` or `~user` made that home folder; where there is none (an unknown user, or HOME unset
    for a uid without a passwd entry) a FluxtrainError `named: no home folder for ~user`."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib's "Could not determine home directory."
        raise FluxtrainError(f"{named}: no home folder for {Path(path).parts[0]}") from None


def path_error(e: BaseException) -> str | None:
    """The one line for an OSError about a path the user gave that no closer check named (a name too long, a folder
    without permission): `path: reason`; None for any other error."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return None


@contextmanager
def paths_named() -> Iterator[None]:
    """Turn an OSError about a path that no closer check named into a FluxtrainError `path: reason`, which the
    commands print in one line as they print their own errors; any other error passes as it is."""
    try:
        yield
    except OSError as e:
        if isinstance(e, FluxtrainError) or (message := path_error(e)) is None:  # a WriteError says it already
            raise
        raise FluxtrainError(message) from None


def discard_stdout() -> None:
    """Send what stdout still holds to /dev/null, so that the flush at exit neither fails nor reports it again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured in a test)
        pass


@contextmanager
def quiet_when_stdout_closes() -> Iterator[None]:
    """Exit with status 1 and no traceback when the reader of stdout has left (`| head`, `| true`), as `python -m
    fluxtrain.generate` does; what stdout still holds is written here, so that the flush at exit cannot fail."""
    try:
        yield
        if sys.stdout is not None:  # None when the command started with stdout closed (`>&-`)
            sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()
        sys.exit(1)


@contextmanager
def held_stdout(hold: bool) -> Iterator[None]:
    """With `hold`, what Hydra prints (`--cfg`, `--help`, `--info`) is written after it returns, where a reader of
    stdout that has left ends the command quietly (`quiet_when_stdout_closes`): Hydra would report it with a
    traceback."""
    if not hold:
        yield
        return
    held = io.StringIO()
    try:
        with redirect_stdout(held):
            yield
    finally:
        sys.stdout.write(held.getvalue())


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is running out of device or host memory: torch's (CUDA, MPS or the CPU allocator) or Python's and
    numpy's MemoryError."""
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and any(phrase in str(e) for phrase in ("can't allocate memory", "out of memory"))
    )


@contextmanager
def out_of_memory_as(problem: str, advice: str = "") -> Iterator[None]:
    """Running out of memory in the block is the FluxtrainError "`problem` (what failed)`advice`"."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise FluxtrainError(f"{problem} ({describe_failure(e)}){advice}") from None


def generation_out_of_memory_message(e: BaseException, settings: str = "--beams or --max-new-tokens") -> str:
    return f"out of memory ({describe_failure(e)}); lower {settings}, or use a smaller model"


def out_of_memory_message(e: BaseException) -> str:
    return (
        f"out of memory ({describe_failure(e)}); lower train.batch_size or model.seq_len, use a smaller model, or "
        "train.grad_accum / train.activation_checkpointing=true"
    )


class OneLineErrorParser(argparse.ArgumentParser):
    """A command line's parser whose mistakes (a missing argument, a bad choice) are one line naming the option,
    without the usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {self.explain(message)} (see --help)\n")

    def explain(self, message: str) -> str:
        """argparse's message, with a hint where one helps."""
        return message
