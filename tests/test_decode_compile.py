"""The compiled decoding step (`--compile`): same tokens as the eager step, and a fallback where compiling fails."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from fluxtrain.generate import main
from fluxtrain.model_file import save_model_file
from fluxtrain.quantize import quantize_int8
from fluxtrain.sampling import SamplingConfig, compile_decoding, generate
from fluxtrain.tokenizer import CharTokenizer

from .test_generate import SEQ_LEN, TEXT, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_compiled_step_decodes_the_same_tokens_past_the_context():
    # int8 weights and rotary positions: the compiled graph holds the int8 kernel and the rotation of q and k.
    model = quantize_int8(tiny_model(pos_emb="rope"))
    compiled = copy.deepcopy(model)
    assert compile_decoding(compiled) is None
    greedy = SamplingConfig(max_new_tokens=3 * SEQ_LEN, temperature=0.0)
    assert generate(compiled, [1, 2, 3], greedy) == generate(model, [1, 2, 3], greedy)
    sampled = SamplingConfig(max_new_tokens=2 * SEQ_LEN, temperature=1.0, top_k=5)
    runs = [generate(m, [4], sampled, torch.Generator().manual_seed(7)) for m in (compiled, model)]
    assert runs[0] == runs[1]


def test_a_failed_compilation_keeps_the_eager_step(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("C compiler not found\nmore details")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_model()
    assert compile_decoding(model) == "RuntimeError: C compiler not found"
    assert "decode_step" not in vars(model)  # the class's own method still answers
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    assert len(generate(model, [1, 2], greedy)) == 10


def test_a_compiler_that_fails_at_once_keeps_the_eager_step(monkeypatch):
    """torch.compile itself can raise before any graph is built (a backend whose imports fail)."""

    def broken(fn, **kwargs):
        raise ImportError("cannot import name '_read_lock_file' from 'filelock._soft'")

    monkeypatch.setattr(torch, "compile", broken)
    model = tiny_model()
    assert compile_decoding(model) == "ImportError: cannot import name '_read_lock_file' from 'filelock._soft'"
    assert "decode_step" not in vars(model)
    assert len(generate(model, [1, 2], SamplingConfig(max_new_tokens=10, temperature=0.0))) == 10


def test_compile_flag_of_the_generate_command(tmp_path, capsys, monkeypatch, decoded_models):
    # The eager backend runs the real torch.compile wrapper without a C compiler.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    path = tmp_path / "model.safetensors"
    save_model_file(path, tiny_model(), CharTokenizer.train(TEXT))
    argv = [str(path), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main([*argv, "--compile"]) == 0
    out, err = capsys.readouterr()
    assert out == eager and "compiling the decoding step" in err and "failed" not in err
    # The second run decoded through a compiled step; the first through the model's own method.
    assert "decode_step" not in vars(decoded_models[0]) and "decode_step" in vars(decoded_models[1])
