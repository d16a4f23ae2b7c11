"""Weight-only int8 quantization for decoding: the stored weights, the error it brings, and decoding with it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fluxtrain import save_model_file
from fluxtrain.errors import FluxtrainError
from fluxtrain.generate import main
from fluxtrain.model import GPT, ModelConfig
from fluxtrain.quantize import DEQUANTIZE_ROWS, KERNEL_WIDTH_MULTIPLE, Int8Linear, quantize_int8
from fluxtrain.sampling import SamplingConfig, generate
from fluxtrain.tokenizer import CharTokenizer
from tests.test_generate import SEQ_LEN, TEXT, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_weights_are_int8_with_one_scale_per_row_and_dequantize_back():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 64) and q.scale.shape == (48,)
    assert int(q.weight.abs().max(dim=1).values.min()) >= 126  # each row's largest weight uses the full range
    error = (q.dequantized(torch.float32) - linear.weight.detach()).abs()
    assert bool((error <= 0.5001 * q.scale.float()[:, None]).all())  # round to nearest: half a step at most
    assert float(error.max()) > 0.3 * float(q.scale.float().min())  # (and it does round)


@pytest.mark.parametrize("rows", [1, 3, DEQUANTIZE_ROWS + 5])
def test_outputs_are_close_to_the_fp32_layer_on_both_paths(rows):
    """One row per new token takes the int8 kernel, a prompt's many rows a dequantized matmul: both stay within
    about 1% of the fp32 layer and agree with each other."""
    torch.manual_seed(1)
    linear = nn.Linear(96, 80)
    q = Int8Linear(linear)
    x = torch.randn(2, rows, 96)
    with torch.no_grad():
        exact, approx = linear(x), q(x)
        one_by_one = torch.cat([q(x[:, i : i + 1]) for i in range(rows)], dim=1)
    assert approx.shape == exact.shape
    scale = exact.abs().max()
    assert float((approx - exact).abs().max()) < 0.02 * scale
    assert float((approx - exact).abs().mean()) < 0.005 * scale
    assert float((one_by_one - approx).abs().max()) < 0.02 * scale


def test_quantized_model_keeps_the_tied_head_and_decodes_like_fp32():
    model = tiny_model(weight_std=0.1)
    q = quantize_int8(copy.deepcopy(model))
    linears = [m for m in q.modules() if isinstance(m, nn.Linear)]
    assert linears == [q.head] and q.head.weight is q.tok_emb.weight  # the tied head stays full precision
    assert sum(isinstance(m, Int8Linear) for m in q.modules()) == 4 * model.cfg.n_layers
    assert not q.training
    idx = torch.tensor([[(5 * i + 1) % model.vocab_size for i in range(SEQ_LEN)]])
    with torch.no_grad():
        exact, approx = model(idx)[0], q(idx)[0]
    assert float((approx - exact).abs().max()) < 0.03 * float(exact.abs().max())
    # The int8 model changes the logits a little; decoding with and without the cache still agree with each other.
    cfg = SamplingConfig(max_new_tokens=3 * SEQ_LEN, temperature=0.0)
    assert generate(q, [1, 2, 3], cfg) == generate(q, [1, 2, 3], cfg, use_cache=False)


def test_generate_command_with_int8_weights(tmp_path, capsys, decoded_models):
    model, tokenizer = tiny_model(), CharTokenizer.train(TEXT)
    path = tmp_path / "model.safetensors"
    save_model_file(path, model, tokenizer)
    code = main([str(path), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "30", "--quantize", "int8"])
    out, err = capsys.readouterr()
    assert code == 0 and "(int8 weights)" in err and f"{model.num_params():,} parameters" in err
    assert any(isinstance(m, Int8Linear) for m in decoded_models[0].modules())
    expected = generate(quantize_int8(copy.deepcopy(model)), tokenizer.encode("ROMEO:"), SamplingConfig(30, 0.0))
    assert out == "ROMEO:" + tokenizer.decode(expected) + "\n"


def test_input_widths_the_int8_kernel_cannot_read_take_the_dequantized_weight(monkeypatch):
    """The CPU kernel reads rows in blocks of 16 and has no remainder code: a layer 40 wide (say `model.d_model=40`)
    read past its rows, giving garbage logits or a segmentation fault. Such layers use the dequantized weight."""
    widths = []
    kernel = torch._weight_int8pack_mm

    def checked_kernel(x, weight, scale):
        widths.append(x.size(1))
        assert x.size(1) % KERNEL_WIDTH_MULTIPLE == 0, f"the int8 kernel was given rows of {x.size(1)} values"
        return kernel(x, weight, scale)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", checked_kernel)
    torch.manual_seed(2)
    for width in (8, 24, 40, 50, 64):
        linear = nn.Linear(width, 30)
        x = torch.randn(1, 1, width)
        with torch.no_grad():
            exact, approx = linear(x), Int8Linear(linear)(x)
        assert float((approx - exact).abs().max()) < 0.02 * float(exact.abs().max()), width
    assert widths == [64]  # the kernel still serves the widths it reads whole

    torch.manual_seed(3)
    model = GPT(ModelConfig(d_model=40, n_heads=2, n_layers=2, ff_dim=72, seq_len=SEQ_LEN), 30).eval()
    cfg = SamplingConfig(max_new_tokens=SEQ_LEN, temperature=0.0)
    q = quantize_int8(copy.deepcopy(model))
    assert generate(q, [1, 2, 3], cfg) == generate(q, [1, 2, 3], cfg, use_cache=False)
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        exact, approx = model(idx)[0], q(idx)[0]
    assert float((approx - exact).abs().max()) < 0.03 * float(exact.abs().max())


def test_a_quantized_model_is_not_saved_as_a_model_file(tmp_path):
    q = quantize_int8(tiny_model())
    with pytest.raises(FluxtrainError, match=r"^model\.safetensors was not written: the model has int8 weights"):
        save_model_file(tmp_path / "model.safetensors", q, CharTokenizer.train(TEXT))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("half_first", [True, False], ids=["half-then-quantize", "quantize-then-half"])
def test_a_half_precision_model_decodes_in_its_own_dtype(half_first):
    """The kernel's product is bfloat16 and it takes bfloat16 scales: a float16 model, halved before or after
    quantizing, gets float16 back from each layer and decodes."""
    model = tiny_model(weight_std=0.1)
    q = quantize_int8(copy.deepcopy(model).half()) if half_first else quantize_int8(copy.deepcopy(model)).half()
    layer = next(m for m in q.modules() if isinstance(m, Int8Linear))
    x = torch.randn(1, 1, layer.in_features, dtype=torch.float16)
    with torch.no_grad():
        assert layer(x).dtype == torch.float16
    cfg = SamplingConfig(max_new_tokens=2 * SEQ_LEN, temperature=0.0)
    assert len(generate(q, [1, 2, 3], cfg)) == 2 * SEQ_LEN
