"""How log lines are written: the console and train.log (Hydra's `job_logging`) format them with `SafeFormatter`."""

from __future__ import annotations

import logging
import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with its lone surrogates as backslash escapes: a byte of a file name that is not UTF-8 (which Python
    keeps as U+DC80..U+DCFF) as `\\xff`, any other as `\\udxxx`; they cannot be written as UTF-8."""

    def escape(m: re.Match) -> str:
        point = ord(m.group())
        return f"\\x{point - 0xDC00:02x}" if 0xDC80 <= point <= 0xDCFF else f"\\u{point:04x}"

    return _SURROGATE.sub(escape, text)


class SafeFormatter(logging.Formatter):
    """A `logging.Formatter` whose lines can always be written as UTF-8: a file name that is not UTF-8 shows with
    backslash escapes instead of a "--- Logging error ---" traceback in place of the line."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))
