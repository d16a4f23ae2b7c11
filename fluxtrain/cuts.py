"""Where a text can be cut so that its pieces, encoded apart and joined, give exactly the ids of the whole text.

Encoding a large corpus in bounded chunks (`fluxtrain.data.safe_chunks`) needs such places. Each tokenizer says where
they are with a `CutRule`: anywhere for the char tokenizer; for a Hugging Face tokenizer, what its tokenizer.json's
normalizer, pre-tokenizer and added tokens provably allow (`hf_cut_rule`), else nowhere, with the reason.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

# Characters that are whitespace to some Unicode version or regex engine but not to Python's `str.isspace`.
_ODD_SPACE = "\u180e\u200b\u200c\u200d\u2060\ufeff"
# The `Split` patterns recognised: GPT-2's (the one ByteLevel uses itself), cl100k's (Llama 3's), and one piece per
# character (a character tokenizer exported by fluxtrain.export).
PER_CHARACTER_PATTERN = r"[\s\S]"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
# Normalizers that never turn a visible character into whitespace or remove one; the others only go with
# pre-tokenizers to which a run of whitespace is one separator whatever its length.
_PLAIN_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}
_SPACE_BLIND_NORMALIZERS = {"StripAccents", "BertNormalizer"}
_SPACE_BLIND_PRE_TOKENIZERS = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer", "Metaspace"}
# Pre-tokenizers that split each piece on its own, whatever came before it (after a first one that cuts safely).
_PER_PIECE = {"ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
_PER_PIECE |= {"UnicodeScripts", "CharDelimiterSplit", "Metaspace"}


@dataclass(frozen=True)
class CutRule:
    """Where a text can be cut so that encoding the two sides apart gives exactly the ids of encoding it whole.

    A cut at c parts text[:c] from text[c:]. `anywhere`: every place is safe (one id per character). Otherwise a cut
    comes before one of the characters in `before`, after a character that is not whitespace when `after_visible`;
    with `class_changes` also between two visible characters of different kinds (letter, digit, other) as GPT-2's
    pattern parts them. No cut touches an added token (`guards`: content, strips the space before, after). An empty
    rule allows no cut; `why_none` says why.
    """

    anywhere: bool = False
    before: str = ""
    after_visible: bool = True
    class_changes: bool = False
    guards: tuple[tuple[str, bool, bool], ...] = ()
    why_none: str = ""

    def last(self, text: str, lo: int, hi: int) -> int | None:
        """The last safe cut c with lo <= c <= hi, or None."""
        lo, hi = max(lo, 1), min(hi, self.limit(text))
        if lo > hi:
            return None
        if self.anywhere:
            return hi
        if self.before:
            pattern = _cut_pattern(self.before, self.after_visible)
            for start in (max(lo, hi - 4096), lo):  # near the end first: the usual case, and fast
                cuts = [m.start() for m in pattern.finditer(text, start, hi + 1)]
                for c in reversed(cuts):
                    if not self._touches_guard(text, c):
                        return c
        if self.class_changes:
            for c in range(hi, lo - 1, -1):
                if _kinds_differ(text, c) and not self._touches_guard(text, c):
                    return c
        return None

    def first(self, text: str, lo: int) -> int | None:
        """The first safe cut c >= lo, or None."""
        lo, hi = max(lo, 1), self.limit(text)
        if lo > hi:
            return None
        if self.anywhere:
            return lo
        found = None
        if self.before:
            for m in _cut_pattern(self.before, self.after_visible).finditer(text, lo, hi + 1):
                if not self._touches_guard(text, m.start()):
                    found = m.start()
                    break
        if self.class_changes:
            for c in range(lo, hi + 1 if found is None else found):
                if _kinds_differ(text, c) and not self._touches_guard(text, c):
                    return c
        return found

    def limit(self, text: str) -> int:
        """The last place a cut can be judged at: one character (or the longest added token) before the end."""
        if self.anywhere:
            return len(text)
        return len(text) - max((len(g[0]) for g in self.guards), default=1)

    def _touches_guard(self, text: str, c: int) -> bool:
        for content, lstrip, rstrip in self.guards:
            at = text.find(content, max(c - len(content), 0), c + len(content))
            if at != -1 and at <= c:
                return True
            if lstrip:  # the token takes the whitespace before it: no cut inside that whitespace
                end = _SPACE_RUN.match(text, c).end()
                if end == len(text) or text.startswith(content, end):
                    return True
            if rstrip:  # ... or after it
                start = c
                while start > 0 and text[start - 1].isspace():
                    start -= 1
                if text.endswith(content, 0, start):
                    return True
        return False


ANYWHERE = CutRule(anywhere=True)
BYTE_LEVEL_CUTS = CutRule(before=" \t\r\n", class_changes=True)  # fluxtrain's byte-level BPE
_SPACE_RUN = re.compile(r"\s*")


@functools.cache
def _cut_pattern(before: str, after_visible: bool) -> re.Pattern:
    chars = "".join(f"\\{c}" if c in "\\]^-" else c for c in before)
    return re.compile((f"(?<=[^\\s{_ODD_SPACE}])" if after_visible else "") + f"[{chars}]")


@functools.lru_cache(maxsize=1 << 16)
def _kind(c: str) -> str | None:
    """What GPT-2's pattern makes of a visible character: "L" (letter), "N" (number) or "P" (other); None for
    whitespace and for characters whose category a regex engine on another Unicode version may not share."""
    category = unicodedata.category(c)
    if category in ("Cn", "Cs") or category != unicodedata.ucd_3_2_0.category(c) or c.isspace() or c in _ODD_SPACE:
        return None
    return category[0] if category[0] in "LN" else "P"


def _kinds_differ(text: str, c: int) -> bool:
    """Whether GPT-2's pattern always ends a piece between text[c - 1] and text[c]: two visible characters of
    different kinds, the first not an apostrophe (which may begin "'s")."""
    before, after = _kind(text[c - 1]), _kind(text[c])
    return before is not None and after is not None and before != after and text[c - 1] != "'"


def hf_cut_rule(data: dict) -> CutRule:
    """The safe cuts of a Hugging Face tokenizer, from its tokenizer.json: those that provably leave its
    pre-tokenization, and so its ids, as they are for the whole text."""
    pre = data.get("pre_tokenizer") or {}
    stages = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    norm = data.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    added = data.get("added_tokens") or []
    if not stages:
        return CutRule(why_none="it has no pre-tokenizer")
    first, kind = stages[0], stages[0].get("type")
    pattern = (first.get("pattern") or {}).get("Regex") if kind == "Split" else None
    split_ok = kind == "Split" and first.get("behavior") == "Isolated" and not first.get("invert")
    if (kind == "ByteLevel" and first.get("use_regex", True)) or (split_ok and pattern == GPT2_PATTERN):
        prefix = kind == "ByteLevel" and first.get("add_prefix_space")
        rule = CutRule(before=" " if prefix else " \t\r\n", class_changes=not prefix and not norms)
    elif split_ok and pattern == CL100K_PATTERN:
        rule = CutRule(before=" ")
    elif split_ok and pattern == PER_CHARACTER_PATTERN and len(stages) == 1 and not norms and not added:
        return ANYWHERE  # a normalizer could join characters (NFC: e + U+0301), an added token span several
    elif kind == "Metaspace" and first.get("split", True):
        rule = CutRule(before=" ", after_visible=False)
    elif kind in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer"):
        rule = CutRule(before=" \t\r\n")
    else:
        return CutRule(why_none=f"its pre-tokenizer {_describe(first)} can join text across any place")
    for stage in stages[1:]:
        if stage.get("type") not in _PER_PIECE or stage.get("prepend_scheme") == "first":
            return CutRule(why_none=f"its pre-tokenizer {_describe(stage)} depends on where a piece starts")
    allowed = _PLAIN_NORMALIZERS | (_SPACE_BLIND_NORMALIZERS if kind in _SPACE_BLIND_PRE_TOKENIZERS else set())
    for n in norms:
        if n.get("type") not in allowed:
            return CutRule(why_none=f"its normalizer {_describe(n)} can change the text across a cut")
    if norms and any(t.get("normalized") for t in added):
        return CutRule(why_none="its added tokens are matched in normalized text")
    guards = tuple((t["content"], bool(t.get("lstrip")), bool(t.get("rstrip"))) for t in added if t.get("content"))
    return CutRule(rule.anywhere, rule.before, rule.after_visible, rule.class_changes, guards)


def _describe(part: dict) -> str:
    return str(part.get("type") or part)
