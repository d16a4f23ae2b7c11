"""Tokenizers behind one small interface: encode, decode, vocab_size, to_json/from_json, save and load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fluxtrain.errors import FluxtrainError


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

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> str: ...


class CharTokenizer:
    """One id per distinct character of the training text, in sorted order."""

    kind = "char"

    def __init__(self, chars: list[str]):
        if not chars:
            raise ValueError("a character tokenizer needs at least one character")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_chars(self, text: str) -> list[str]:
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise UnknownCharactersError(self.unknown_chars(text)) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")


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
    raise ValueError(f"unknown tokenizer type {data.get('type')!r}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FluxtrainError(f"tokenizer file {path} does not exist")
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FluxtrainError(f"{path} is not a fluxtrain tokenizer file: {e}") from None


def build_tokenizer(cfg: TokenizerConfig, corpus: str, train_text: str) -> Tokenizer:
    """The tokenizer chosen by `tokenizer.kind`, loaded from `tokenizer.path` or built from the text.

    The character vocabulary covers the whole corpus (so validation text always encodes); learned tokenizers
    see only the training split.
    """
    if cfg.path:
        return load_tokenizer(cfg.path)
    if cfg.kind == "char":
        return CharTokenizer.train(corpus)
    raise FluxtrainError(f"tokenizer.kind={cfg.kind!r} is not one of char")
