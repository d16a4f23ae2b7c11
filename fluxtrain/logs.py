"""How log lines are written: the console and train.log (Hydra's `job_logging`) format them with `SafeFormatter`."""

from __future__ import annotations

import logging
import re

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
