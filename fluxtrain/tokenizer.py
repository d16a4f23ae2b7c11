"""Tokenizers behind one small interface: encode, decode, vocab_size, to_json/from_json, save and load."""

from __future__ import annotations

import itertools
import json
import logging
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fluxtrain.cuts import ANYWHERE, CutRule, hf_cut_rule
from fluxtrain.errors import FluxtrainError, expand_home, first_line
from fluxtrain.files import atomic_write, atomic_write_text, parse_json, user_path

log = logging.getLogger(__name__)

KINDS = ("char", "bpe")
MIN_BPE_VOCAB = 257  # the 256 byte symbols plus at least one merge
BYTE_SYMBOLS = frozenset(pre_tokenizers.ByteLevel.alphabet())  # the characters a byte-level BPE writes bytes as


@dataclass
class TokenizerConfig:
    kind: str = "char"  # char | bpe
    vocab_size: int = 1024  # bpe only
    path: str | None = None  # an existing tokenizer file to reuse instead of building one


class EncodeError(FluxtrainError):
    """Text the tokenizer cannot turn into ids."""


class UnknownCharactersError(EncodeError):
    """Text holds characters the tokenizer has no id for."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        shown = ", ".join(repr(c) for c in chars[:20]) + (", ..." if len(chars) > 20 else "")
        super().__init__(f"{len(chars)} character(s) not in the tokenizer's vocabulary: {shown}")


class Tokenizer(Protocol):
    kind: str  # char | bpe: which class reads the saved JSON
    unk_id: int | None  # the unknown token's id, where the tokenizer reads characters it lacks as one
    may_lack_chars: bool  # whether some characters get no token (`unknown_chars`, an error naming them)

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def unknown_chars(self, text: str) -> list[str]: ...  # sorted; those an encoding refuses

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids: list[int]) -> str: ...

    def cut_rule(self) -> CutRule: ...

    def to_json(self) -> str: ...

    def save(self, path: str | Path) -> None: ...


def lone_surrogate_error(e: UnicodeEncodeError) -> EncodeError:
    """A text holding a lone surrogate (a str made from bytes that are not UTF-8, with errors="surrogateescape")."""
    return EncodeError(
        f"the text holds a lone surrogate, U+{ord(e.object[e.start]):04X} at character {e.start}, which is no "
        "character: read the text as UTF-8 (errors='replace' keeps bad bytes as U+FFFD)"
    )


def check_no_surrogates(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise lone_surrogate_error(e) from None


def id_sequence(ids: Iterable[Any]) -> list[Any]:
    """`ids` (any iterable, read once) as a list; a tensor or array must be 1-D: a batch's row, not the batch."""
    if (shape := getattr(ids, "shape", None)) is not None and len(shape) != 1:
        raise FluxtrainError(f"token ids must be one sequence (1-D), not an array of shape {tuple(shape)}")
    return list(ids)


def check_ids(ids: Sequence[Any], vocab_size: int) -> None:
    """Token ids a tokenizer of `vocab_size` can decode: integers from 0 to vocab_size - 1."""
    if (bad := first_id_outside(ids, vocab_size)) is not None:
        problem = (
            "is not an integer" if not is_integer(ids[bad]) else f"is not in the vocabulary (ids 0 to {vocab_size - 1})"
        )
        raise FluxtrainError(f"token id {shown(ids[bad])!r} {problem}")


def shown(value: Any) -> Any:
    """A numpy or torch scalar as the Python number it holds (39 rather than tensor(39)); anything else as it is."""
    try:
        return value.item()
    except (AttributeError, ValueError, RuntimeError):  # no scalar, or several values
        return value


def is_integer(value: Any) -> bool:
    """An integer, numpy's and torch's too (a 0-d integer tensor), but no bool."""
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == torch.bool:
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def first_id_outside(ids: Sequence[Any], vocab_size: int) -> int | None:
    """The position of the first of `ids` that is no token id of a `vocab_size` vocabulary (an integer, numpy and
    torch ones too, from 0 to vocab_size - 1); None when every one is."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer):  # a corpus: vectorised
        outside = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        return int(outside[0]) if len(outside) else None
    for position, i in enumerate(ids):
        if not is_integer(i) or not 0 <= operator.index(i) < vocab_size:
            return position
    return None


class CharTokenizer:
    """One id per distinct character of the training text, in sorted order."""

    kind = "char"
    name = "char"  # what logs and messages call it
    unk_id = None
    may_lack_chars = True

    def __init__(self, chars: list[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("a character tokenizer needs at least one character")
        if not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("a character tokenizer's 'chars' must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("a character tokenizer lists a character twice")
        if any(0xD800 <= ord(c) <= 0xDFFF for c in chars):
            raise ValueError("a character tokenizer holds a lone surrogate, which no UTF-8 text contains")
        self.chars = chars
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

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - self.stoi.keys())

    def encode_array(self, text: str) -> np.ndarray:
        try:
            points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        except UnicodeEncodeError as e:
            raise lone_surrogate_error(e) from None
        pos = np.searchsorted(self._sorted_points, points).clip(max=len(self.chars) - 1)
        if not np.array_equal(self._sorted_points[pos], points):
            raise UnknownCharactersError(self.unknown_chars(text))
        return self._order[pos]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids: list[int]) -> str:
        ids = id_sequence(ids)
        check_ids(ids, self.vocab_size)
        return "".join(self.chars[i] for i in ids)

    def cut_rule(self) -> CutRule:
        """Text can be encoded in pieces cut anywhere: one id per character."""
        return ANYWHERE

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(user_path(path, "tokenizer file"), self.to_json())


def _unknown_id(hf: HFTokenizer, model: dict[str, Any]) -> int | None:
    """The id of the unknown token where the tokenizer has one: BPE, WordPiece and WordLevel name the token,
    Unigram gives its id (in `model`, the parsed JSON's model; read here where it is not yet)."""
    if hasattr(hf.model, "unk_token"):
        return hf.token_to_id(hf.model.unk_token) if hf.model.unk_token is not None else None
    model = model or json.loads(hf.to_str()).get("model", {})
    unk_id = model.get("unk_id")
    return unk_id if isinstance(unk_id, int) else None


class BPETokenizer:
    """A Hugging Face `tokenizers` tokenizer; trained here as a byte-level BPE, which round-trips any text."""

    kind = "bpe"

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self._cuts: CutRule | None = None
        # A model with no unknown token and no byte fallback leaves a character its vocabulary lacks out of the ids,
        # without a word; one split into single characters whose unknown token is not in its vocabulary (a char
        # tokenizer exported by fluxtrain.export, WordLevel) fails on it. Such characters are refused as the char
        # tokenizer refuses them (`unknown_chars`). A byte-level pre-tokenizer over a vocabulary with all 256 byte
        # symbols (fluxtrain's BPE) keeps every one.
        byte_level = type(hf.pre_tokenizer).__name__ == "ByteLevel" and BYTE_SYMBOLS <= hf.get_vocab().keys()
        parsed = json.loads(hf.to_str()) if not byte_level else {}
        model = parsed.get("model", {})
        self.unk_id = _unknown_id(hf, model)
        self._per_character = not byte_level and hf_cut_rule(parsed).anywhere
        if self._per_character:  # a character it lacks needs an unknown token its vocabulary holds
            reads_unknown = self.unk_id is not None
        else:
            reads_unknown = model.get("unk_token") is not None or model.get("unk_id") is not None
        self.may_lack_chars = not (byte_level or reads_unknown or model.get("byte_fallback"))
        self._kept: dict[str, bool] = {}  # character -> whether it gets a token, for those seen so far

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
    def name(self) -> str:
        """What logs call it: bpe for a BPE model, else the model's kind in `tokenizers` (WordLevel, Unigram, ...)."""
        model = type(self.hf.model).__name__
        return "bpe" if model == "BPE" else model

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode several texts in parallel (Rust threads)."""
        for text in texts:
            self._check_kept(text)
        try:
            encodings = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        except Exception as e:  # the Rust side raises a plain Exception (a WordLevel model without an unknown token)
            for text in texts:
                check_no_surrogates(text)  # what the Rust side calls "must be str"
            raise EncodeError(f"the tokenizer cannot encode the text: {first_line(e)}") from None
        return [np.array(e.ids, dtype=np.int64) for e in encodings]

    def encode(self, text: str) -> list[int]:
        self._check_kept(text)
        try:
            return self.hf.encode(text, add_special_tokens=False).ids
        except Exception as e:
            check_no_surrogates(text)
            raise EncodeError(f"the tokenizer cannot encode the text: {first_line(e)}") from None

    def _check_kept(self, text: str) -> None:
        if dropped := self.unknown_chars(text):
            raise UnknownCharactersError(dropped)

    def unknown_chars(self, text: str) -> list[str]:
        """The characters of `text` that the tokenizer would leave out or cannot encode, sorted. A character is kept
        when it gets a token of its own, or is whitespace or something the normalizer removes (a pre-tokenizer or
        normalizer may drop those by design); each distinct character is tried once."""
        if not self.may_lack_chars:
            return []
        chars = set(text)
        for c in chars.difference(self._kept):
            if 0xD800 <= ord(c) <= 0xDFFF:  # no text holds one: the encoding names it
                continue
            try:
                normalized = self.hf.normalizer.normalize_str(c) if self.hf.normalizer is not None else c
                ids = self.hf.encode(c, add_special_tokens=False).ids
            except Exception:  # the Rust side's plain Exception: WordLevel without its unknown token
                if self._per_character:  # this character, whitespace too, has no id
                    self._kept[c] = False
                continue  # else a word it lacks, not this character: the encoding reports it
            self._kept[c] = bool(ids) or c.isspace() or not normalized.strip()
        return sorted(c for c in chars if not self._kept.get(c, True))

    def decode(self, ids: list[int]) -> str:
        ids = id_sequence(ids)
        check_ids(ids, self.vocab_size)
        return self.hf.decode(ids, skip_special_tokens=False)

    def cut_rule(self) -> CutRule:
        """Where text can be cut into pieces encoded apart (read from the tokenizer's parts; said once when
        nowhere, as the text is then encoded in one piece)."""
        if self._cuts is None:
            self._cuts = hf_cut_rule(json.loads(self.hf.to_str()))
            if self._cuts.why_none:
                log.warning(
                    f"tokenizer: {self._cuts.why_none}, so text is encoded in one piece (memory grows with the text)"
                )
        return self._cuts

    def to_json(self) -> str:
        return json.dumps({"type": "bpe", "tokenizer": self.hf.to_str()}, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        """A plain Hugging Face tokenizer.json, loadable by `tokenizers.Tokenizer.from_file`."""
        atomic_write(user_path(path, "tokenizer file"), lambda tmp: self.hf.save(str(tmp)))


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


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a tokenizer from its JSON form (as written by `to_json` or a Hugging Face tokenizer.json)."""
    data = parse_json(text)
    if not isinstance(data, dict):
        raise ValueError("tokenizer JSON is not an object")
    if data.get("type") == "char":
        chars = data.get("chars")
        if not isinstance(chars, list):
            raise ValueError("char tokenizer JSON needs 'chars', a list of single characters")
        return CharTokenizer(chars)  # which checks them
    if data.get("type") == "bpe":
        if not isinstance(data.get("tokenizer"), str):
            raise ValueError("bpe tokenizer JSON needs 'tokenizer', a Hugging Face tokenizer.json string")
        return BPETokenizer(_hf_from_str(data["tokenizer"]))
    if "model" in data:  # a plain Hugging Face tokenizer.json
        return BPETokenizer(_hf_from_str(text))
    raise ValueError(f"unknown tokenizer type {data.get('type')!r}")


def _hf_from_str(text: str) -> HFTokenizer:
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a plain Exception for malformed files
        raise ValueError(f"not a valid Hugging Face tokenizer ({first_line(e)})") from None
    ids = hf.get_vocab(with_added_tokens=True).values()
    size = hf.get_vocab_size(with_added_tokens=True)
    if not ids:
        raise ValueError("the Hugging Face tokenizer has an empty vocabulary")
    if max(ids) >= size:  # the model's embedding has `size` rows: a larger id would index past them
        raise ValueError(
            f"the Hugging Face tokenizer has id {max(ids)} in a vocabulary of {size} (ids must be 0..{size - 1})"
        )
    return hf


def load_tokenizer(path: str | Path, setting: str = "tokenizer.path") -> Tokenizer:
    """A tokenizer file: fluxtrain's char format or a Hugging Face tokenizer.json."""
    path = expand_home(path, f"{setting} {path}" if setting.isupper() else f"{setting}={path}")
    data = _read_tokenizer_file(path, setting)
    try:
        return tokenizer_from_json(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FluxtrainError(f"{setting}: {path} is not a tokenizer file: {e}") from None


def _read_tokenizer_file(path: Path, setting: str) -> bytes:
    """The bytes of the tokenizer file `path`, or a one-line error naming `setting`."""
    try:
        if path.is_dir():
            raise FluxtrainError(
                f"{setting}: {path} is a folder; give its tokenizer file (e.g. {path / 'tokenizer.json'})"
            )
        if path.exists() and not path.is_file():  # reading a FIFO waits for a writer, a device may never end
            raise FluxtrainError(f"{setting}: {path} is not a regular file")
        if not path.is_file():
            raise FluxtrainError(f"{setting}: tokenizer file {path} does not exist")
        return path.read_bytes()
    except OSError as e:  # no permission, a name too long, a file that refuses reads (/proc/self/mem)
        raise FluxtrainError(f"{setting}: {path} cannot be read: {e.strerror or first_line(e)}") from None


def validate(cfg: TokenizerConfig) -> None:
    if cfg.path is not None and not str(cfg.path).strip():  # most likely an unset shell variable
        raise FluxtrainError(f"tokenizer.path={cfg.path!r} is empty; give a tokenizer file, or null to build one")
    if cfg.kind not in KINDS:
        raise FluxtrainError(f"tokenizer.kind={cfg.kind!r} is not one of {', '.join(KINDS)}")
    if cfg.kind == "bpe" and not cfg.path and cfg.vocab_size < MIN_BPE_VOCAB:
        raise FluxtrainError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for byte-level BPE (at least {MIN_BPE_VOCAB})"
        )


def warn_unused(cfg: TokenizerConfig) -> None:
    """A warning for a setting the chosen tokenizer does not use."""
    if cfg.kind == "char" and not cfg.path and cfg.vocab_size != TokenizerConfig.vocab_size:
        log.warning(
            f"tokenizer.vocab_size={cfg.vocab_size} is for tokenizer=bpe and is ignored: the char tokenizer has one "
            "token per character of the corpus"
        )


def load_configured(cfg: TokenizerConfig) -> Tokenizer:
    """`tokenizer.path`'s tokenizer, saying when it is of another kind than `tokenizer=` asks for."""
    tokenizer = load_tokenizer(cfg.path)
    if tokenizer.kind != cfg.kind:
        log.warning(f"tokenizer.path={cfg.path} holds a {tokenizer.name} tokenizer: tokenizer={cfg.kind} is ignored")
    return tokenizer


def build_tokenizer(cfg: TokenizerConfig, corpus: str | Iterable[str], train_text: str | Iterable[str]) -> Tokenizer:
    """The tokenizer chosen by `tokenizer.kind`, loaded from `tokenizer.path` or built from the text.

    The character vocabulary covers the whole corpus (so validation text always encodes); learned tokenizers
    see only the training split. Both texts may be iterables of pieces; only the one needed is read.
    """
    validate(cfg)
    if cfg.path:
        return load_configured(cfg)
    if cfg.kind == "char":
        return CharTokenizer.train(corpus)
    tokenizer = BPETokenizer.train(train_text, cfg.vocab_size)
    if tokenizer.vocab_size < cfg.vocab_size:
        log.warning(
            f"tokenizer.vocab_size={cfg.vocab_size}: the training text gave only {tokenizer.vocab_size} tokens "
            "(no pair left to merge)"
        )
    return tokenizer
