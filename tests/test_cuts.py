"""Cutting text into chunks to encode apart: bounded chunks for any text, and exactly the ids of the whole text."""

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from fluxtrain.cuts import CL100K_PATTERN, GPT2_PATTERN
from fluxtrain.data import encode_stream, safe_chunks
from fluxtrain.tokenizer import BPETokenizer, CharTokenizer

from .conftest import make_text

# Scripts without spaces, combining marks, whitespace only some engines call whitespace, what NFKC turns into
# spaces or letters, apostrophes that begin contractions, added tokens and Metaspace's own replacement character.
_ODD = [
    "雷",
    "電",
    "。",
    "，",
    "ไทย",
    "हिन्दी",
    "\u0301",
    "ΑΣ",
    "ς",
    "Ａ",
    "①",
    "²",
    "¨",
    "ﬁ",
    "🌩",
    "▁",
    "'",
    "'s",
    "'LL",
]
_SPACES = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "\u00a0", "\u3000", "\u2028", "\u0085", "\x1c", "\v", "\f"]
_SPACES += ["\u180e", "\u200b", "\ufeff", "\u2007"]
_PARTS = list("ab Z9_.:-") + ["word", "123", "<|endoftext|>", "<mask>"] + _ODD + _SPACES
_ALPHABET = st.sampled_from(_PARTS)
SAMPLE = make_text(3000) + "".join(s * 3 + "x" for s in _ODD + _SPACES) + " 雷電。雷電，雷電 12345 ab'sab 'll"


def hf(pre_tokenizer, normalizer=None, model="bpe", added=()) -> BPETokenizer:
    if model == "bpe":
        tok = HFTokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False)
    else:
        tok = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]"], show_progress=False)
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.train_from_iterator([SAMPLE], trainer)
    if added:
        tok.add_special_tokens(list(added))
    return BPETokenizer(tok)


def fluxtrain_bpe() -> BPETokenizer:
    return BPETokenizer.train(SAMPLE, 500)


def byte_level_with_added_tokens() -> BPETokenizer:
    added = [AddedToken("<|endoftext|>"), AddedToken("<mask>", lstrip=True, rstrip=True)]
    return hf(pre_tokenizers.ByteLevel(add_prefix_space=False), added=added)


TOKENIZERS = {
    "char": lambda: CharTokenizer.train(SAMPLE + "".join(_PARTS)),
    "bpe": fluxtrain_bpe,
    "byte-level, added tokens": byte_level_with_added_tokens,
    "byte-level, prefix space": lambda: hf(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "byte-level, NFKC and lowercase": lambda: hf(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()]),
    ),
    "metaspace, always": lambda: hf(pre_tokenizers.Metaspace(prepend_scheme="always")),
    "metaspace, first, NFD and no accents": lambda: hf(
        pre_tokenizers.Metaspace(prepend_scheme="first"),
        normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()]),
    ),
    "metaspace, never": lambda: hf(pre_tokenizers.Metaspace(prepend_scheme="never")),
    "whitespace, wordpiece": lambda: hf(pre_tokenizers.Whitespace(), model="wordpiece"),
    "bert": lambda: hf(pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(), model="wordpiece"),
    "split gpt-2, digits": lambda: hf(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(GPT2_PATTERN), "isolated"),
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ),
    "split cl100k (llama 3)": lambda: hf(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CL100K_PATTERN), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ),
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tokenizer(request):
    tok = TOKENIZERS[request.param]()
    assert not getattr(tok.cut_rule(), "why_none", ""), request.param
    return tok


def chunked_ids(tokenizer, text: str, target: int, piece: int) -> list[int]:
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    chunks = list(safe_chunks(pieces, target, tokenizer.cut_rule()))
    assert "".join(chunks) == text
    return [i for c in chunks for i in tokenizer.encode(c)]


@settings(max_examples=250, deadline=None)
@given(parts=st.lists(_ALPHABET, max_size=60), target=st.integers(1, 12), piece=st.integers(1, 9))
def test_chunked_ids_are_the_whole_texts_ids(tokenizer, parts, target, piece):
    text = "".join(parts)
    assert chunked_ids(tokenizer, text, target, piece) == tokenizer.encode(text)


def test_chunks_stay_bounded_without_spaces(tokenizer):
    """Text without a space (Chinese, Japanese, Thai) still has places to cut: after 。 before a newline for
    byte-level BPE, between a letter and a punctuation mark or digit where the pre-tokenizer always parts them, or
    anywhere for the char tokenizer."""
    lines = "".join(("雷電風雨" * 7)[i % 11 :][:25] + "。\n" for i in range(400))
    one_line = lines.replace("\n", "，")
    rule = tokenizer.cut_rule()
    for text in (lines, one_line):
        chunks = list(safe_chunks([text[i : i + 1000] for i in range(0, len(text), 1000)], 500, rule))
        assert "".join(chunks) == text
        # Cut before a newline where the tokenizer allows it, inside a line where it parts "，" from letters.
        if rule.anywhere or (text is lines and "\n" in rule.before) or (text is one_line and rule.class_changes):
            assert max(map(len, chunks)) <= 500, [len(c) for c in chunks][:20]
        if rule.anywhere:
            assert {len(c) for c in chunks[:-1]} == {500}


def test_a_run_of_letters_is_kept_whole_by_bpe_and_cut_by_char():
    text = "雷電" * 5000
    pieces = [text[i : i + 999] for i in range(0, len(text), 999)]
    assert list(safe_chunks(pieces, 1000, fluxtrain_bpe().cut_rule())) == [text]  # one pre-token: no exact cut
    assert len(list(safe_chunks(pieces, 1000, CharTokenizer.train(text).cut_rule()))) == 10


def test_encode_stream_cuts_where_the_tokenizer_allows():
    text = "雷電風雨" * 150_000  # no newline, no space: the char tokenizer cuts anywhere
    char = CharTokenizer.train(text)
    arrays = list(encode_stream([text], char))
    assert [i for a in arrays for i in a.tolist()] == char.encode(text)
    assert max(len(a) for a in arrays) <= 1 << 18


def test_a_tokenizer_without_safe_cuts_is_encoded_whole_and_said(caplog):
    tok = HFTokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([SAMPLE], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    bpe = BPETokenizer(tok)
    with caplog.at_level(logging.WARNING, logger="fluxtrain.tokenizer"):
        rule = bpe.cut_rule()
    assert "it has no pre-tokenizer, so text is encoded in one piece" in caplog.text
    text = SAMPLE[:5000]
    assert list(safe_chunks([text[:2000], text[2000:]], 100, rule)) == [text]
