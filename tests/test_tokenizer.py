"""Tokenizers: char and byte-level BPE behind one interface, their files, and their use in training and model files."""

import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from fluxtrain import data as data_module
from fluxtrain.data import DataConfig, encode_stream, load_corpus, safe_chunks
from fluxtrain.errors import FluxtrainError
from fluxtrain.model_file import load_model
from fluxtrain.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    EncodeError,
    TokenizerConfig,
    UnknownCharactersError,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)
from fluxtrain.train import train

from .conftest import compose_config, make_text


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(make_text(20_000), vocab_size=300)


@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_bpe_round_trips_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text


def test_bpe_learns_merges_within_the_vocab_size(bpe):
    assert 256 < bpe.vocab_size <= 300
    assert not bpe.may_lack_chars  # byte-level over all 256 byte symbols: no character to check for, chunk by chunk
    text = make_text(2_000, seed=1)
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 1.5  # 44 merges already compress this text


def test_bpe_encodes_unseen_characters_as_bytes(bpe):
    text = "Грозный 雷 🌩 naïve"
    ids = bpe.encode(text)
    assert len(ids) >= len("Грозный 雷 🌩 naïve".encode()) - 4  # mostly single bytes: none of this was seen
    assert bpe.decode(ids) == text


def test_char_tokenizer_reports_unknown_characters():
    tok = CharTokenizer.train("hello world")
    assert tok.decode(tok.encode("low hole")) == "low hole"
    with pytest.raises(UnknownCharactersError, match=r"2 character\(s\).*'X'.*'é'"):
        tok.encode("hello X é")


def test_char_encode_matches_a_plain_lookup():
    text = make_text(3_000) + "ünïcødé 🎉"
    tok = CharTokenizer.train(text)
    assert tok.encode(text) == [tok.stoi[c] for c in text]
    assert [a.tolist() for a in tok.encode_batch([text[:10], ""])] == [tok.encode(text[:10]), []]


@pytest.mark.parametrize("make", [lambda: CharTokenizer.train("abc\n é"), lambda: BPETokenizer.train("abc " * 50, 260)])
def test_json_round_trip_as_embedded_in_model_files(make):
    tok = make()
    again = tokenizer_from_json(tok.to_json())
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.encode("abc é") == tok.encode("abc é")


def test_bpe_saves_a_plain_hugging_face_file(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    assert json.loads(path.read_text())["model"]["type"] == "BPE"
    hf = HFTokenizer.from_file(str(path))
    assert hf.encode("ROMEO: good night").ids == bpe.encode("ROMEO: good night")
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer) and loaded.encode("sweet") == bpe.encode("sweet")
    assert BPETokenizer.load(path).vocab_size == bpe.vocab_size


def test_bad_tokenizer_files_are_one_line_errors(tmp_path):
    with pytest.raises(FluxtrainError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FluxtrainError, match=f"^TOKENIZER: {tmp_path} is a folder; give its tokenizer file"):
        load_tokenizer(tmp_path, setting="TOKENIZER")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "nonsense"}}')
    with pytest.raises(FluxtrainError, match="tokenizer.path: .*bad.json is not a tokenizer file"):
        load_tokenizer(bad)


def test_tokenizer_files_that_are_no_regular_file_or_cannot_be_read_are_one_line_errors(tmp_path):
    """A FIFO would wait for a writer and a device may never end: neither is opened; a read that fails is named."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, Path(os.devnull)):
        with pytest.raises(FluxtrainError) as e:
            load_tokenizer(path, setting="TOKENIZER")
        assert str(e.value) == f"TOKENIZER: {path} is not a regular file"
    long_name = tmp_path / ("t" * 300)
    with pytest.raises(FluxtrainError) as e:
        load_tokenizer(long_name, setting="TOKENIZER")
    assert str(e.value) == f"TOKENIZER: {long_name} cannot be read: File name too long"
    if Path("/proc/self/mem").is_file():  # a regular file whose reads fail (Linux)
        with pytest.raises(FluxtrainError, match="^TOKENIZER: /proc/self/mem cannot be read: Input/output error$"):
            load_tokenizer("/proc/self/mem", setting="TOKENIZER")


def hf_file(path: Path, model) -> Path:
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(path))
    return path


@pytest.mark.parametrize(
    "content, problem",
    [
        ('{"type": "char", "chars": ["a", "b", "a"]}', "a character tokenizer lists a character twice"),
        (
            '{"type": "char", "chars": ["a", "\\ud800"]}',
            "a character tokenizer holds a lone surrogate, which no UTF-8 text contains",
        ),
        ('{"type": "char", "chars": ["ab", "c"]}', "a character tokenizer's 'chars' must be single characters"),
        (models.WordLevel(vocab={}, unk_token=None), "the Hugging Face tokenizer has an empty vocabulary"),
        (
            models.WordLevel(vocab={"a": 0, "b": 7}, unk_token=None),
            "the Hugging Face tokenizer has id 7 in a vocabulary of 2 (ids must be 0..1)",
        ),
    ],
)
def test_tokenizer_files_a_model_cannot_use_are_refused(tmp_path, content, problem):
    """Ids past the vocabulary size index past the model's embedding; a surrogate has no UTF-8 bytes for bpb."""
    path = tmp_path / "tokenizer.json"
    if isinstance(content, str):
        path.write_text(content)
    else:
        hf_file(path, content)
    with pytest.raises(FluxtrainError) as e:
        load_tokenizer(path)
    assert str(e.value) == f"tokenizer.path: {path} is not a tokenizer file: {problem}"


def test_a_tokenizer_that_cannot_encode_the_text_is_a_one_line_error(tmp_path):
    path = hf_file(tmp_path / "words.json", models.WordLevel(vocab={"hello": 0, "world": 1}, unk_token=None))
    text = tmp_path / "a.txt"
    text.write_text("hello there world\n" * 50)
    cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FluxtrainError) as e:
        load_corpus(cfg, TokenizerConfig(path=str(path)), 16)
    assert str(e.value) == (
        "data.path: the tokenizer cannot encode the text: WordLevel error: Missing [UNK] token from the vocabulary "
        "(the tokenizer comes from tokenizer.path)"
    )


def test_tokenizer_settings_are_checked_first_and_a_file_of_another_kind_is_said(tmp_path, caplog):
    missing = DataConfig(path=str(tmp_path / "missing.txt"), cache_dir=str(tmp_path / "cache"))
    char_file = tmp_path / "char.json"
    CharTokenizer.train(make_text(3_000)).save(char_file)
    for tok_cfg, message in (
        (TokenizerConfig(path=""), "tokenizer.path='' is empty; give a tokenizer file, or null to build one"),
        (TokenizerConfig(kind="word", path=str(char_file)), "tokenizer.kind='word' is not one of char, bpe"),
    ):
        with pytest.raises(FluxtrainError) as e:
            load_corpus(missing, tok_cfg, 16)  # before the data: its error would be "does not exist"
        assert str(e.value) == message
    text = tmp_path / "a.txt"
    text.write_text(make_text(3_000))
    cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        _, tok, _ = load_corpus(cfg, TokenizerConfig(kind="bpe", path=str(char_file)), 16)
    assert tok.kind == "char"
    assert f"tokenizer.path={char_file} holds a char tokenizer: tokenizer=bpe is ignored" in caplog.text


def test_a_hugging_face_tokenizer_is_named_by_its_model_and_knows_its_unknown_id(tmp_path, caplog):
    words = hf_file(tmp_path / "words.json", models.WordLevel(vocab={"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    unigram = hf_file(tmp_path / "unigram.json", models.Unigram([("a", -1.0), ("<unk>", 0.0)], 1))
    bpe = BPETokenizer.train(make_text(3_000), 300)
    assert [(t.name, t.unk_id) for t in (load_tokenizer(words), load_tokenizer(unigram), bpe)] == [
        ("WordLevel", 1),
        ("Unigram", 1),
        ("bpe", None),
    ]
    assert CharTokenizer.train("ab").unk_id is None
    text = tmp_path / "a.txt"
    text.write_text("hello hello\n" * 50)
    cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        load_corpus(cfg, TokenizerConfig(kind="char", path=str(words)), 4)
    assert f"tokenizer.path={words} holds a WordLevel tokenizer: tokenizer=char is ignored" in caplog.text


def test_a_lone_surrogate_is_named_by_either_tokenizer():
    """A str made from bytes that are not UTF-8 (errors="surrogateescape") holds them as lone surrogates."""
    text = b"ab\x80c".decode("utf-8", errors="surrogateescape")
    message = r"^the text holds a lone surrogate, U\+DC80 at character 2, which is no character: read the text as UTF-8"
    char, bpe = CharTokenizer.train("abc"), BPETokenizer.train(make_text(3_000), 300)
    for encode in (char.encode, bpe.encode, lambda t: char.encode_batch([t]), lambda t: bpe.encode_batch(["ok", t])):
        with pytest.raises(EncodeError, match=message):
            encode(text)


def test_config_validation():
    with pytest.raises(FluxtrainError, match="tokenizer.kind='wordpiece' is not one of char, bpe"):
        build_tokenizer(TokenizerConfig(kind="wordpiece"), "abc", "abc")
    with pytest.raises(FluxtrainError, match="tokenizer.vocab_size=100 is too small"):
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=100), "abc", "abc")


def test_bpe_preset_composes():
    cfg = compose_config(["tokenizer=bpe"])
    assert cfg.tokenizer.kind == "bpe" and cfg.tokenizer.vocab_size == 1024


def test_bpe_training_run_embeds_the_tokenizer(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    metrics = train(tiny_cfg("tokenizer=bpe", "tokenizer.vocab_size=320"), run)
    assert metrics["iters"] == 30
    saved = load_tokenizer(run / "tokenizer.json")
    model, embedded = load_model(run / "model_final.safetensors")
    assert isinstance(embedded, BPETokenizer) and embedded.vocab_size == saved.vocab_size == 320
    assert model.vocab_size == 320
    assert embedded.encode("KING: sweet night") == saved.encode("KING: sweet night")


def test_tokenizer_path_is_reused_not_retrained(tiny_cfg, tmp_path, bpe):
    given_file = tmp_path / "given.json"
    bpe.save(given_file)
    run = tmp_path / "run"
    train(tiny_cfg("tokenizer=bpe", f"tokenizer.path={given_file}", "train.max_iters=2"), run)
    assert json.loads((run / "tokenizer.json").read_text()) == json.loads(given_file.read_text())
    _, embedded = load_model(run / "model_final.safetensors")
    assert embedded.vocab_size == bpe.vocab_size == 300  # a fresh training would have used the preset's 1024


def test_lossy_tokenizer_file_is_warned_about(tiny_text_file, tmp_path, caplog):
    hf = BPETokenizer.train(make_text(5_000), 300).hf
    hf.normalizer = normalizers.Lowercase()  # a tokenizer that cannot give back "ROMEO"
    path = tmp_path / "lower.json"
    hf.save(str(path))
    cfg = DataConfig(path=str(tiny_text_file), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        _, tok, _ = load_corpus(cfg, TokenizerConfig(path=str(path)), 16)
    assert tok.decode(tok.encode("ROMEO")) == "romeo"
    assert any("does not reproduce the text exactly" in r.message for r in caplog.records)


def test_char_tokenizer_file_with_missing_characters_is_a_clear_error(tiny_cfg, tmp_path):
    small = tmp_path / "small.json"
    CharTokenizer.train("abc").save(small)
    with pytest.raises(
        FluxtrainError, match=r"data.path: .*not in the tokenizer's vocabulary.*comes from tokenizer.path"
    ):
        train(tiny_cfg(f"tokenizer.path={small}"), tmp_path / "run")


@pytest.mark.parametrize("val_path", [False, True])
def test_bpe_learns_from_the_training_text_only(tmp_path, val_path):
    """A word that fills the validation text (its last 10%, or data.val_path) is frequent enough to get merges,
    but it must not: the tokenizer sees only the training text."""
    train_text, val_text = make_text(18_000), "zqxv " * 400
    tok_cfg = TokenizerConfig(kind="bpe", vocab_size=300)
    if val_path:
        (tmp_path / "train.txt").write_text(train_text, encoding="utf-8")
        (tmp_path / "val.txt").write_text(val_text, encoding="utf-8")
        cfg = DataConfig(path=str(tmp_path / "train.txt"), val_path=str(tmp_path / "val.txt"), cache=False)
    else:
        (tmp_path / "all.txt").write_text(train_text + val_text, encoding="utf-8")
        cfg = DataConfig(path=str(tmp_path / "all.txt"), val_fraction=0.1, cache=False)
    _, tokenizer, _ = load_corpus(cfg, tok_cfg, seq_len=16)
    learned = [tokenizer.hf.id_to_token(i) for i in range(tokenizer.vocab_size)]
    assert not [t for t in learned if len(t) > 1 and set(t) <= set("zqxv")]
    assert len(tokenizer.encode("zqxv")) == 4  # one byte each
    assert any(len(t) > 3 and t.isalpha() for t in learned)  # the training words did get merges


def test_what_the_tokenizer_settings_cannot_give_is_said(tmp_path, caplog):
    text = "abc abd abe " * 20
    with caplog.at_level(logging.WARNING, logger="fluxtrain.tokenizer"):
        bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=5000), text, text)
    assert bpe.vocab_size < 5000
    assert f"tokenizer.vocab_size=5000: the training text gave only {bpe.vocab_size} tokens" in caplog.text
    char_file = tmp_path / "char.json"
    CharTokenizer.train(text).save(char_file)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxtrain.tokenizer"):
        loaded = build_tokenizer(TokenizerConfig(kind="bpe", path=str(char_file)), text, text)
    assert loaded.kind == "char"
    assert f"tokenizer.path={char_file} holds a char tokenizer: tokenizer=bpe is ignored" in caplog.text


def test_a_huge_vocab_size_is_lowered_to_what_the_text_allows(caplog):
    """The trainer sets aside memory for the whole vocabulary: 500,000,000 used to abort the process."""
    code = (
        "from fluxtrain.tokenizer import TokenizerConfig, build_tokenizer\n"
        "text = 'abc abd abe ' * 160\n"
        "print(build_tokenizer(TokenizerConfig(kind='bpe', vocab_size=500_000_000), text, text).vocab_size)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 257 <= int(done.stdout) < 2000
    assert "tokenizer.vocab_size=500000000: the training text gave only" in done.stderr
    with caplog.at_level(logging.WARNING, logger="fluxtrain.tokenizer"):
        bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=100_000_000), ["ab"] * 10, ["ab"] * 10)
    assert bpe.vocab_size == 257 and "vocab_size=100000000: the training text gave only 257 tokens" in caplog.text


def test_a_vocab_size_with_the_char_tokenizer_is_said_to_be_ignored_once_a_run(tmp_path, caplog):
    text = tmp_path / "a.txt"
    text.write_text(make_text(3_000))
    cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # built, then from the cache
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fluxtrain"):
            _, tok, _ = load_corpus(cfg, TokenizerConfig(kind="char", vocab_size=500), 16)
        assert tok.vocab_size == len(set(text.read_text()))
        warned = [r.getMessage() for r in caplog.records]
        assert warned == [
            "tokenizer.vocab_size=500 is for tokenizer=bpe and is ignored: the char tokenizer has one token per "
            "character of the corpus"
        ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        load_corpus(cfg, TokenizerConfig(kind="char"), 16)
    assert not caplog.records


def test_a_tokenizer_file_that_would_leave_characters_out_is_refused(tmp_path):
    """A Hugging Face BPE with no unknown token and no byte fallback drops what its vocabulary lacks, silently: the
    model would train on what is left. One with an unknown token keeps a token for each, and is used."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    text = tmp_path / "a.txt"
    text.write_text("abc de\nfab " * 300)
    cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
    lossy = tmp_path / "lossy.json"
    HFTokenizer(models.BPE({"a": 0, "b": 1, "e": 2}, [])).save(str(lossy))
    with pytest.raises(FluxtrainError) as e:
        load_corpus(cfg, TokenizerConfig(kind="bpe", path=str(lossy)), 16)
    assert str(e.value) == (
        "data.path: 3 character(s) not in the tokenizer's vocabulary: 'c', 'd', 'f' (the tokenizer comes from "
        "tokenizer.path)"
    )
    # Anywhere in the text, not only at its start: a corpus whose first 20,000 characters the vocabulary covers.
    text.write_text("abe " * 5_000 + "abc" * 10)
    with pytest.raises(FluxtrainError, match=r"^data.path: 1 character\(s\) not in the tokenizer's vocabulary: 'c' "):
        load_corpus(cfg, TokenizerConfig(kind="bpe", path=str(lossy)), 16)
    with pytest.raises(UnknownCharactersError):
        load_tokenizer(lossy).encode("a cab")  # a prompt, as fluxtrain-generate encodes it

    with_unknown = tmp_path / "unk.json"
    HFTokenizer(models.BPE({"a": 0, "b": 1, "e": 2, "<unk>": 3}, [], unk_token="<unk>")).save(str(with_unknown))
    text.write_text("abc de\nfab " * 300)
    data, tokenizer, _ = load_corpus(cfg, TokenizerConfig(kind="bpe", path=str(with_unknown)), 16)
    assert tokenizer.vocab_size == 4 and len(data.train) + len(data.val) == len(text.read_text())  # one token each


def test_an_exported_char_tokenizer_names_the_characters_it_lacks_and_cuts_anywhere(tmp_path, caplog):
    """fluxtrain.export writes a char tokenizer as a WordLevel vocabulary of single characters with no unknown token:
    read back as tokenizer.path, a character it lacks is named as the char tokenizer names it, not a library error."""
    from fluxtrain.export import char_tokenizers_model

    exported = BPETokenizer(char_tokenizers_model(["\n", " ", "a", "b"]))
    assert exported.may_lack_chars and exported.unknown_chars("ab 日a本\n") == ["日", "本"]
    assert exported.unknown_chars("a\r\nb\tb\xa0") == ["\t", "\r", "\xa0"]  # whitespace it lacks too: Windows lines
    with pytest.raises(UnknownCharactersError) as e:
        exported.encode("ab 日")
    assert e.value.chars == ["日"]
    assert exported.encode("ab a\n") == [2, 3, 1, 2, 0]
    with caplog.at_level(logging.WARNING, logger="fluxtrain"):
        assert exported.cut_rule().anywhere  # one piece per character, as the char tokenizer's
    assert caplog.text == ""
    # A normalizer could join two characters into one (NFC: e + U+0301), so no cut is known then.
    normalized = char_tokenizers_model(["e", "\u0301", "é"])
    normalized.normalizer = normalizers.NFC()
    assert not BPETokenizer(normalized).cut_rule().anywhere
    # A word-level vocabulary without its unknown token lacks words, not characters: the encoding says so.
    words = BPETokenizer(HFTokenizer.from_file(str(hf_file(tmp_path / "w.json", models.WordLevel({"hi": 0}, None)))))
    assert not words.may_lack_chars and words.unknown_chars("hi ho") == []


def test_an_unknown_character_error_names_those_of_the_whole_text(tmp_path, monkeypatch):
    """The tokenizer file is tried on the start of the text, and the text is encoded in batches of chunks: the first
    that fails must not hide the characters further on."""
    tokenizer_file = tmp_path / "tok.json"
    CharTokenizer.train("ab c\n").save(tokenizer_file)
    text = tmp_path / "a.txt"
    text.write_text("é" + "ab c\n" * 3_000 + "Z" + "ab c\n" * 100 + "Ω")  # 'Z' and 'Ω' past the 10,000 tried
    cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FluxtrainError) as e:
        load_corpus(cfg, TokenizerConfig(path=str(tokenizer_file)), 16)
    assert str(e.value).startswith("data.path: 3 character(s) not in the tokenizer's vocabulary: 'Z', 'é', 'Ω'")
    # Chunks of about 1,000 characters, encoded 2 at a time: the first batch fails, with 2 more chunks to come.
    monkeypatch.setattr(data_module, "safe_chunks", lambda pieces, cuts: safe_chunks(pieces, 1_000, cuts))
    monkeypatch.setattr(data_module, "ENCODE_BATCH", 2)
    pieces = ["ab é" + "ab c\n" * 1_000, "ab c\n" * 1_000 + "Z", "ab c\n" * 1_000 + "Ω"]
    with pytest.raises(FluxtrainError, match=r"^data.path: 3 character\(s\) not .*: 'Z', 'é', 'Ω' \(the tokenizer"):
        list(encode_stream(pieces, CharTokenizer.train("ab c\n")))
    many = UnknownCharactersError([chr(0x4E00 + i) for i in range(25)])
    assert str(many).startswith("25 character(s) not in the tokenizer's vocabulary: '一', ") and str(many).endswith(
        f"{chr(0x4E00 + 19)!r}, ..."
    )


def test_the_bpe_trainer_gets_a_long_stretch_with_no_cut_in_bounded_pieces():
    """A line of DNA is one word to byte-level BPE, and the trainer's time grows with the square of a word's
    length (a 200,000-letter line: 7.5 s, against 0.2 s in pieces)."""
    rng = random.Random(0)
    dna = "".join(rng.choices("ACGT", k=3 * data_module.TRAIN_PIECE)) + "\n"
    text = make_text(50_000) + dna + make_text(50_000)
    pieces = list(data_module.trainer_pieces([text]))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= data_module.TRAIN_PIECE
    # Text that offers places to cut goes as it did: whole words only.
    assert list(data_module.trainer_pieces([make_text(300_000)])) == list(safe_chunks([make_text(300_000)], 1 << 16))


def test_a_long_text_encodes_in_batches_to_the_ids_of_the_whole(monkeypatch):
    """`encode_text` (a prompt piped on stdin) keeps memory to a batch of pieces, not a whole book."""
    text = make_text(20_000)
    tokenizers = [CharTokenizer.train(text), BPETokenizer.train(text, 300)]
    whole = [t.encode(text) for t in tokenizers]
    monkeypatch.setattr(data_module, "ENCODE_CHUNK", 1_000)
    monkeypatch.setattr(data_module, "ENCODE_BATCH", 3)
    encode_batch = BPETokenizer.encode_batch
    batches = []
    monkeypatch.setattr(BPETokenizer, "encode_batch", lambda self, b: batches.append(len(b)) or encode_batch(self, b))
    assert [data_module.encode_text(t, text) for t in tokenizers] == whole
    assert len(batches) > 5 and max(batches) == 3
