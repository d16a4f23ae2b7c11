"""Block variants (RMSNorm, rotary positions, relu2/SwiGLU MLPs, no bias): numerics, causality and KV-cache decoding."""

import itertools
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from fluxtrain.errors import FluxtrainError
from fluxtrain.model import GPT, MLP, ModelConfig, RMSNorm, apply_rope, rope_tables

from .conftest import param_count_formula

VARIANTS = [
    dict(norm=norm, pos_emb=pos, activation=act, bias=bias)
    for norm, pos, act, bias in itertools.product(
        ("layernorm", "rmsnorm"), ("learned", "rope"), ("gelu", "relu2", "swiglu"), (True, False)
    )
]


def tiny(**kw) -> ModelConfig:
    return ModelConfig(d_model=32, n_heads=4, n_layers=2, ff_dim=48, seq_len=16, **kw)


def test_rmsnorm_matches_its_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = rope_tables(8, 32)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        rq = apply_rope(q.view(1, 1, 1, 8), cos[m : m + 1], sin[m : m + 1])
        rk = apply_rope(k.view(1, 1, 1, 8), cos[n : n + 1], sin[n : n + 1])
        return (rq * rk).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17))
    torch.testing.assert_close(score(3, 3), (q * k).sum())  # equal positions: the rotation cancels
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rope_matches_the_complex_rotation():
    """Each pair (x_i, x_{i + hd/2}) read as x_i + i x_{i + hd/2} is multiplied by e^(i m theta_i) at position m,
    with theta_i = 10000 ** (-2i / hd)."""
    torch.manual_seed(0)
    hd, length = 16, 40
    x = torch.randn(2, 3, length, hd)
    theta = 10000.0 ** (-torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * theta
    x64 = x.double()
    z = torch.complex(x64[..., : hd // 2], x64[..., hd // 2 :]) * torch.polar(torch.ones_like(angles), angles)
    want = torch.cat((z.real, z.imag), dim=-1).float()
    torch.testing.assert_close(apply_rope(x, *rope_tables(hd, length)), want, atol=1e-5, rtol=1e-5)


def test_rope_keeps_vector_norms():
    cos, sin = rope_tables(16, 10)
    x = torch.randn(2, 3, 10, 16)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("activation", ["gelu", "relu2", "swiglu"])
def test_mlp_activation_formulas(activation):
    torch.manual_seed(0)
    mlp = MLP(tiny(activation=activation))
    x = torch.randn(2, 3, 32)
    h = x @ mlp.fc.weight.T + mlp.fc.bias
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    elif activation == "relu2":
        h = torch.relu(h) ** 2
    else:
        h = F.gelu(h)
    torch.testing.assert_close(mlp(x), h @ mlp.proj.weight.T + mlp.proj.bias)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_variant_is_causal_and_cached_decoding_matches(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant), vocab_size=11).eval()
    idx = torch.randint(11, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 11) and torch.isfinite(loss)
    # Causal: changing the last token leaves every earlier position's logits unchanged.
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 11
    torch.testing.assert_close(model(changed)[0][:, :-1], logits[:, :-1])
    # A prompt then one token at a time through the KV cache gives the same logits as one full pass.
    cache = model.new_cache(batch=2)
    steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), logits, atol=1e-5, rtol=1e-4)
    # So does the one-position decoding step that generation uses after the prompt.
    cache = model.new_cache(batch=2)
    with torch.inference_mode():
        steps = [model(idx[:, :5], cache=cache)[0][:, -1]] + [model.decode_step(idx[:, t], cache) for t in range(5, 16)]
    assert cache.length == 16
    torch.testing.assert_close(torch.stack(steps, dim=1), logits[:, 4:], atol=1e-5, rtol=1e-4)
    with pytest.raises(FluxtrainError, match="sequence of 17 tokens is longer than model.seq_len=16"):
        model.decode_step(idx[:, 0], cache)


def test_bias_false_removes_every_bias():
    model = GPT(tiny(bias=False, norm="layernorm"), vocab_size=11)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    with_bias = GPT(tiny(bias=True), vocab_size=11)
    assert [n for n, _ in with_bias.named_parameters() if n.endswith("bias")]


def test_parameter_counts_of_variants():
    cfg = tiny()
    assert GPT(cfg, 11).num_params() == param_count_formula(cfg, 11)
    # Rotary positions drop the (seq_len, d) table; SwiGLU adds a second (d, ff) input matrix per layer.
    assert GPT(tiny(pos_emb="rope"), 11).num_params() == param_count_formula(cfg, 11) - 16 * 32
    extra = 2 * (32 * 48 + 48)
    assert GPT(tiny(activation="swiglu"), 11).num_params() == param_count_formula(cfg, 11) + extra


@pytest.mark.parametrize(
    "kw, setting",
    [
        (dict(norm="batchnorm"), "model.norm"),
        (dict(pos_emb="alibi"), "model.pos_emb"),
        (dict(activation="tanh"), "model.activation"),
    ],
)
def test_unknown_variant_names_the_setting(kw, setting):
    with pytest.raises(FluxtrainError, match=setting):
        tiny(**kw).validate()


def test_rope_needs_an_even_head_size():
    with pytest.raises(FluxtrainError, match="model.pos_emb=rope"):
        ModelConfig(d_model=12, n_heads=4, pos_emb="rope").validate()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(d_model=float("nan")), "model.d_model=nan must be a positive integer"),
        (dict(n_heads=2.0), "model.n_heads=2.0 must be a positive integer"),
        (dict(n_layers=-1), "model.n_layers=-1 must be a positive integer"),
        (dict(ff_dim=0), "model.ff_dim=0 must be a positive integer"),
        (dict(d_model=None), "model.d_model=None must be a positive integer"),
        (dict(dropout=float("nan")), r"model.dropout=nan must be in \[0, 1\)"),
        (dict(dropout="0.1"), r"model.dropout='0.1' must be in \[0, 1\)"),
        (dict(bias="no"), "model.bias='no' must be true or false"),
        (dict(d_model=36, n_heads=4, pos_emb="rope"), "rope needs an even head size; model.d_model / model.n_heads"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_setting(kw, message):
    with pytest.raises(FluxtrainError, match=message):
        GPT(ModelConfig(**{**asdict(tiny()), **kw}), vocab_size=11)
