"""Model files: a save/load round trip gives identical logits; damaged and foreign files give one-line errors."""

import pytest
import torch
from safetensors.torch import save_file

from fluxtrain import load_model, save_model_file
from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.tokenizer import CharTokenizer


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    tokenizer = CharTokenizer.train("hello world, good night\n")
    model = GPT(
        ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=16, dropout=0.1), tokenizer.vocab_size
    )
    path = tmp_path / "model.safetensors"
    save_model_file(path, model, tokenizer)
    return model.eval(), tokenizer, path


def test_round_trip_gives_identical_logits(saved):
    model, tokenizer, path = saved
    loaded, loaded_tok = load_model(path)
    x = torch.tensor([tokenizer.encode("hello night")])
    assert torch.equal(model(x)[0], loaded(x)[0])
    assert loaded.cfg == model.cfg and loaded_tok.decode(loaded_tok.encode("good world")) == "good world"
    assert loaded.head.weight is loaded.tok_emb.weight


def test_compiled_model_saves_plain_keys(saved, tmp_path):
    model, tokenizer, _ = saved
    path = tmp_path / "compiled.safetensors"
    save_model_file(path, torch.compile(model), tokenizer)  # wrapping only: nothing is compiled until called
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if k.startswith(("_orig_mod.", "module."))]
    load_model(path)


def test_missing_empty_truncated_and_foreign_files(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(FluxtrainError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(FluxtrainError, match="is empty"):
        load_model(empty)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FluxtrainError, match=f"{truncated} is not a readable safetensors model file"):
        load_model(truncated)
    random_file = tmp_path / "random.safetensors"
    random_file.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(FluxtrainError, match="not a readable safetensors"):
        load_model(random_file)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(FluxtrainError, match="not a fluxtrain model file"):
        load_model(foreign)
