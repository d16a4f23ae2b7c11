"""The model: parameter counts against the formula, shapes, causality and the KV cache."""

import pytest
import torch

from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, ModelConfig, param_count_formula

from .conftest import compose_config


@pytest.mark.parametrize("preset", ["small", "medium", "large"])
def test_preset_param_count_matches_formula(preset):
    cfg = ModelConfig(**compose_config([f"model={preset}"]).model)
    with torch.device("meta"):
        model = GPT(cfg, vocab_size=65)
    assert model.num_params() == param_count_formula(cfg, 65)


def test_small_param_count_by_hand():
    # small: d=128, 2 layers, ff 512, context 64, vocab 65 (Tiny Shakespeare).
    d, ff, layers, ctx, vocab = 128, 512, 2, 64, 65
    per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    expected = vocab * d + ctx * d + layers * per_layer + 2 * d
    assert expected == 413_312
    assert (
        GPT(ModelConfig(d_model=d, n_heads=4, n_layers=layers, ff_dim=ff, seq_len=ctx), vocab).num_params() == expected
    )


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(d_model=32, n_heads=4, n_layers=2, ff_dim=64, seq_len=16, **kw), vocab_size=11).eval()


def test_forward_shapes_and_loss():
    model = tiny()
    x = torch.randint(0, 11, (3, 16))
    logits, loss = model(x, x)
    assert logits.shape == (3, 16, 11)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.5
    assert model.head.weight is model.tok_emb.weight  # tied


def test_causal_future_tokens_do_not_change_past_logits():
    model = tiny()
    x = torch.randint(0, 11, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 11
    assert torch.allclose(model(x)[0][:, :10], model(y)[0][:, :10], atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"pos_emb": "rope", "norm": "rmsnorm", "activation": "swiglu"}])
def test_kv_cache_matches_full_forward(variant):
    model = tiny(**variant)
    x = torch.randint(0, 11, (2, 16))
    full, _ = model(x)
    cache = model.new_cache(2)
    chunks = [model(x[:, :5], cache=cache)[0]] + [model(x[:, i : i + 1], cache=cache)[0] for i in range(5, 12)]
    chunks.append(model(x[:, 12:], cache=cache)[0])  # a multi-token step after cached positions
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_longer_than_context_is_a_clear_error():
    with pytest.raises(FluxtrainError, match="longer than model.seq_len=16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))
