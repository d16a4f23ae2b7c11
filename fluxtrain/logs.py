"""How a run's logs are written: the console and train.log (Hydra's `job_logging`) format lines with `SafeFormatter`;
TensorBoard's events go through `EventWriter`, whose failures are one line."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxtrain.files import WriteError

if TYPE_CHECKING:  # imported by the logging config, and by fluxtrain.generate: no TensorBoard import there
    from torch.utils.tensorboard import SummaryWriter


def silenced() -> bool:
    """Whether the logging config silenced fluxtrain's log (hydra/job_logging=disabled)."""
    return logging.getLogger("fluxtrain").disabled


def report_error(message: str) -> None:
    """Log the error that ends a run; printed on stderr instead where the log is `silenced()`, so that a run that
    fails still says why."""
    if silenced():
        print(message, file=sys.stderr)
    else:
        logging.getLogger("fluxtrain").error(message)


_SURROGATE = re.compile("[\ud800-\udfff]")
# Control characters but newline and tab, as `\\x1b`: text from a model or a file name cannot change the state of
# the terminal that shows it (clear the screen, retitle the window, ring the bell).
CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


def printable(text: str) -> str:
    """`text` with its control characters (but newline, tab and the CR of a CRLF line end, which is dropped) and its
    lone surrogates as backslash escapes: a byte of a file name that is not UTF-8 (which Python keeps as
    U+DC80..U+DCFF) as `\\xff`, any other surrogate as `\\udxxx`; they cannot be written as UTF-8."""

    def escape(m: re.Match) -> str:
        point = ord(m.group())
        return f"\\x{point - 0xDC00:02x}" if 0xDC80 <= point <= 0xDCFF else f"\\u{point:04x}"

    return _SURROGATE.sub(escape, text.replace("\r\n", "\n").translate(CONTROL_ESCAPES))  # a CRLF line ends a line


class SafeFormatter(logging.Formatter):
    """A `logging.Formatter` whose lines can always be written as UTF-8 and shown safely: a file name that is not UTF-8
    shows with backslash escapes instead of a "--- Logging error ---" traceback in place of the line, and so do control
    characters in a sample of generated text."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class _StopsOnFailure:
    """For a logging handler: a write that fails (a full disk, a console whose reader left) stops the handler after
    one line on stderr, instead of Python's "--- Logging error ---" traceback for every line that follows."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        error = sys.exc_info()[1]
        if isinstance(error, BrokenPipeError) or sys.stderr is None:  # the reader of the console left: nothing to say
            return
        reason = getattr(error, "strerror", None) or error
        with contextlib.suppress(Exception):
            print(f"warning: {self.target()} cannot be written ({reason}); its log lines stop here", file=sys.stderr)

    def target(self) -> str:
        return "the log"


class ConsoleHandler(_StopsOnFailure, logging.StreamHandler):
    """The console's log handler (Hydra's `job_logging.handlers.console`)."""

    def target(self) -> str:
        return "the console"


class LogFileHandler(_StopsOnFailure, logging.FileHandler):
    """The run's log file, train.log (Hydra's `job_logging.handlers.file`)."""

    def target(self) -> str:
        return self.baseFilename


class EventWriter:
    """A TensorBoard `SummaryWriter` (every method passed through) whose failures to write, such as a full disk, are a
    WriteError naming its event file; the traceback its writer thread prints for them is left out (see
    `quiet_event_writer_threads`)."""

    def __init__(self, writer: SummaryWriter):
        self.writer = writer
        event_writer = getattr(writer.file_writer, "event_writer", None)
        self.path = Path(getattr(event_writer, "_file_name", writer.get_logdir()))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.writer, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except OSError as e:
                raise WriteError(self.path, e) from None

        return call

    def close_after_failure(self) -> None:
        """Close the writer as a failed run ends: an error in writing its last events would hide the run's own."""
        with contextlib.suppress(OSError):
            self.writer.close()


class NullWriter:
    """Stands in for the TensorBoard writer where nothing is logged (torchrun ranks > 0): every attribute and call
    does nothing."""

    def __getattr__(self, name: str) -> NullWriter:
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def quiet_event_writer_threads() -> Iterator[None]:
    """Leave out the traceback that TensorBoard's writer thread prints when a write fails: the next call of the writer
    in the main thread raises the same error, which `EventWriter` reports in one line."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


@contextlib.contextmanager
def event_writer(run_dir: Path, **kwargs: Any) -> Iterator[EventWriter]:
    """A TensorBoard writer into `run_dir` whose failures to write are one line (`EventWriter`); closed at the end,
    where a failure already raised is not hidden by one in writing the last events."""
    from torch.utils.tensorboard import SummaryWriter  # here: logs.py is imported where TensorBoard is not needed

    with quiet_event_writer_threads():
        writer = EventWriter(SummaryWriter(log_dir=str(run_dir), **kwargs))
        try:
            yield writer
        finally:
            writer.close_after_failure()
