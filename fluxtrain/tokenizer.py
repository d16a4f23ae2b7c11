"""Tokenizers behind one small interface: encode, decode, vocab_size, to_json/from_json, save and load."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fluxtrain.errors import FluxtrainError, first_line
from fluxtrain.files import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

KINDS = ("char", "bpe")
MIN_BPE_VOCAB = 257  # the 256 byte symbols plus at least one merge


@dataclass
class TokenizerConfig:
    kind: str = "char"  # char | bpe
    vocab_size: int = 1024  # bpe only
    path: str | None = None  # an existing tokenizer file to reuse instead of building one


class UnknownCharactersError(FluxtrainError):
    """Text holds characters the tokenizer has no id for."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        shown = ", ".join(repr(c) for c in chars[:20])
        super().__init__(f"{len(chars)} character(s) not in the tokenizer's vocabulary: {shown}")


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self) -> np.ndarray: ...

    def cut_rule(self) -> CutRule: ...

    def to_json(self) -> str: ...

    def save(self, path: str | Path) -> None: ...


class CharTokenizer:
    """One id per distinct character of the training text, in sorted order."""

    kind = "char"

    def __init__(self, chars: list[str]):
        if not chars:
            raise ValueError("a character tokenizer needs at least one character")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # Code points in sorted order and the id of each, for encoding whole arrays at once.
        points = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        self._order = np.argsort(points)
        self._sorted_points = points[self._order]

    @classmethod
    def train(cls, text: str | Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            chars.update(piece)
        return cls(sorted(chars))

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        tokenizer = load_tokenizer(path)
        if not isinstance(tokenizer, cls):
            raise FluxtrainError(f"{path} holds a {tokenizer.kind} tokenizer, not a char tokenizer")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - self.stoi.keys())

    def encode_array(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        pos = np.searchsorted(self._sorted_points, points).clip(max=len(self.chars) - 1)
        if not np.array_equal(self._sorted_points[pos], points):
            raise UnknownCharactersError(self.unknown_chars(text))
        return self._order[pos]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 length in bytes of each token, by id."""
        return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)

    def cut_rule(self) -> CutRule:
        """Text can be encoded in pieces cut anywhere: one id per character."""
        return ANYWHERE

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())


class BPETokenizer:
    """A Hugging Face `tokenizers` tokenizer; trained here as a byte-level BPE, which round-trips any text."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self._cuts: CutRule | None = None

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> BPETokenizer:
        if vocab_size < MIN_BPE_VOCAB:
            raise FluxtrainError(
                f"tokenizer.vocab_size={vocab_size} is too small for byte-level BPE (at least {MIN_BPE_VOCAB})"
            )
        pieces, vocab_size = _merges_the_text_allows([text] if isinstance(text, str) else text, vocab_size)
        hf = HFTokenizer(models.BPE())
        # No prefix space: text is encoded in chunks, and a space added at each chunk start would change the ids.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        hf.train_from_iterator(pieces, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        tokenizer = load_tokenizer(path)
        if not isinstance(tokenizer, cls):
            raise FluxtrainError(f"{path} holds a {tokenizer.kind} tokenizer, not a Hugging Face tokenizer")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode several texts in parallel (Rust threads)."""
        encodings = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """Length in bytes of the text each token stands for, by id."""
        byte_level = type(self.hf.decoder).__name__ == "ByteLevel"
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i) or ""
            if byte_level and set(token) <= alphabet:
                out[i] = len(token)  # each symbol of a byte-level token is one byte
            else:
                out[i] = len(self.hf.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out

    def cut_rule(self) -> CutRule:
        """Where text can be cut into pieces encoded apart (read from the tokenizer's parts; said once when
        nowhere, as the text is then encoded in one piece)."""
        if self._cuts is None:
            self._cuts = _hf_cut_rule(json.loads(self.hf.to_str()))
            if self._cuts.why_none:
                log.warning(
                    f"tokenizer: {self._cuts.why_none}, so text is encoded in one piece (memory grows with the text)"
                )
        return self._cuts

    def to_json(self) -> str:
        return json.dumps({"type": "bpe", "tokenizer": self.hf.to_str()}, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        """A plain Hugging Face tokenizer.json, loadable by `tokenizers.Tokenizer.from_file`."""
        atomic_write(path, lambda tmp: self.hf.save(str(tmp)))


def _merges_the_text_allows(pieces: Iterable[str], vocab_size: int) -> tuple[Iterable[str], int]:
    """The pieces (read ahead no further than needed) and `vocab_size`, lowered to what the text can give.

    Each merge joins at least one pair of adjacent bytes of the text, so n bytes give at most n - 1 merges. The
    trainer sets aside memory for the whole vocabulary before it starts: unbounded, a huge `tokenizer.vocab_size`
    aborts the process.
    """
    head: list[str] = []
    n_bytes = 0
    rest = iter(pieces)
    for piece in rest:
        head.append(piece)
        n_bytes += len(piece.encode("utf-8", "surrogatepass"))
        if n_bytes > vocab_size:
            return itertools.chain(head, rest), vocab_size
    return head, min(vocab_size, max(MIN_BPE_VOCAB, 255 + n_bytes))


# ----------------------------------------------------------------------------------------------------------------------
# Where a text can be cut: the ids of the pieces, one after another, are exactly the ids of the whole text

# Characters that are whitespace to some Unicode version or regex engine but not to Python's `str.isspace`.
_ODD_SPACE = "\u180e\u200b\u200c\u200d\u2060\ufeff"
# The `Split` patterns recognised: GPT-2's (the one ByteLevel uses itself) and cl100k's (Llama 3's).
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


def _hf_cut_rule(data: dict) -> CutRule:
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


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer from its JSON form (as written by `to_json` or a Hugging Face tokenizer.json)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("tokenizer JSON is not an object")
    if data.get("type") == "char":
        chars = data.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("char tokenizer JSON needs 'chars', a list of single characters")
        return CharTokenizer(chars)
    if data.get("type") == "bpe":
        if not isinstance(data.get("tokenizer"), str):
            raise ValueError("bpe tokenizer JSON needs 'tokenizer', a Hugging Face tokenizer.json string")
        return BPETokenizer(_hf_from_str(data["tokenizer"]))
    if "model" in data:  # a plain Hugging Face tokenizer.json
        return BPETokenizer(_hf_from_str(text))
    raise ValueError(f"unknown tokenizer type {data.get('type')!r}")


def _hf_from_str(text: str) -> HFTokenizer:
    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a plain Exception for malformed files
        raise ValueError(f"not a valid Hugging Face tokenizer ({first_line(e)})") from None


def load_tokenizer(path: str | Path, setting: str = "tokenizer.path") -> Tokenizer:
    """A tokenizer file: fluxtrain's char format or a Hugging Face tokenizer.json."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FluxtrainError(f"{setting}: {path} is a folder; give its tokenizer file (e.g. {path / 'tokenizer.json'})")
    if not path.is_file():
        raise FluxtrainError(f"{setting}: tokenizer file {path} does not exist")
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FluxtrainError(f"{setting}: {path} is not a tokenizer file: {e}") from None


def validate(cfg: TokenizerConfig) -> None:
    if cfg.kind not in KINDS:
        raise FluxtrainError(f"tokenizer.kind={cfg.kind!r} is not one of {', '.join(KINDS)}")
    if cfg.kind == "bpe" and not cfg.path and cfg.vocab_size < MIN_BPE_VOCAB:
        raise FluxtrainError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for byte-level BPE (at least {MIN_BPE_VOCAB})"
        )


def build_tokenizer(cfg: TokenizerConfig, corpus: str | Iterable[str], train_text: str | Iterable[str]) -> Tokenizer:
    """The tokenizer chosen by `tokenizer.kind`, loaded from `tokenizer.path` or built from the text.

    The character vocabulary covers the whole corpus (so validation text always encodes); learned tokenizers
    see only the training split. Both texts may be iterables of pieces; only the one needed is read.
    """
    validate(cfg)
    if cfg.path:
        tokenizer = load_tokenizer(cfg.path)
        if tokenizer.kind != cfg.kind:
            log.warning(
                f"tokenizer.path={cfg.path} holds a {tokenizer.kind} tokenizer: tokenizer={cfg.kind} is ignored"
            )
        return tokenizer
    if cfg.kind == "char":
        return CharTokenizer.train(corpus)
    tokenizer = BPETokenizer.train(train_text, cfg.vocab_size)
    if tokenizer.vocab_size < cfg.vocab_size:
        log.warning(
            f"tokenizer.vocab_size={cfg.vocab_size}: the training text gave only {tokenizer.vocab_size} tokens "
            "(no pair left to merge)"
        )
    return tokenizer
