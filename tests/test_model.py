"""The model: parameter counts against the formula, shapes, causality and the KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fluxtrain.errors import FluxtrainError
from fluxtrain.model import (
    CPU_FP32_ATTENTION_KEYS,
    GPT,
    ModelConfig,
    attention,
    flops_per_token,
)

from .conftest import compose_config, param_count_formula


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


def test_built_from_python_mistakes_are_named():
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, ff_dim=32, seq_len=16)
    for vocab_size in ("50", None, 50.0, True, 0):
        with pytest.raises(FluxtrainError, match=r"^vocab_size=.* must be a positive integer$"):
            GPT(cfg, vocab_size)
    with pytest.raises(FluxtrainError, match=r"^model.d_model='32' must be a positive integer$"):  # a text, quoted
        ModelConfig(d_model="32").validate()
    with pytest.raises(FluxtrainError, match=r"^idx must be token ids of shape \(batch, time\), not \(3,\)$"):
        tiny()(torch.tensor([1, 2, 3]))
    model, x = tiny(), torch.tensor([[1, 2, 3], [4, 5, 6]])
    for args, message in (
        ((x.float(),), r"idx must hold integer token ids \(torch.long or torch.int\), not torch.float32"),
        ((x.bool(),), r"idx must hold integer token ids \(torch.long or torch.int\), not torch.bool"),
        ((x, x.int()), r"targets must hold integer token ids \(torch.long\), not torch.int32"),
        ((x, x.T), r"targets of shape \(3, 2\) must have the shape of idx, \(2, 3\)"),
        ((x, x.reshape(-1)), r"targets must be token ids of shape \(batch, time\), not \(6,\)"),
        ((x[:, :0], x[:, :0]), r"idx of shape \(2, 0\) holds no tokens"),
        ((x + 5,), r"idx holds token id 11, outside the model's vocabulary of 11"),
        ((x, x - 2), r"targets holds token id -1, outside the model's vocabulary of 11"),
    ):
        with pytest.raises(FluxtrainError, match=f"^{message}$"):
            model(*args)
    assert model(x.int(), x)[1].item() == pytest.approx(model(x, x)[1].item())  # int32 ids are ids
    composed = compose_config(["model=small"]).model  # a composed config's slice builds the model too
    assert GPT(composed, 10).cfg == ModelConfig(**composed)


def test_a_config_that_is_no_model_config_or_has_unknown_fields_is_named():
    fields = "; ModelConfig has d_model, n_heads, n_layers, ff_dim, seq_len, dropout, norm, pos_emb, activation, bias$"
    with pytest.raises(FluxtrainError, match=r"^cfg has unknown field\(s\) 'foo'" + fields):
        GPT({"d_model": 32, "n_heads": 2, "foo": 1}, 10)
    hinted = r"^cfg has unknown field\(s\) 'd_modl' \(did you mean 'd_model'\?\), 'x';"
    with pytest.raises(FluxtrainError, match=hinted):
        GPT({"d_modl": 32, "x": 1}, 10)
    for cfg, kind in ((None, "NoneType"), ("small", "str"), ([("d_model", 32)], "list")):
        with pytest.raises(FluxtrainError, match=f"^cfg must be a ModelConfig or a dict of its fields, not {kind}$"):
            GPT(cfg, 10)
    assert GPT({"d_model": 32, "n_heads": 2, "n_layers": 1}, 10).cfg == ModelConfig(d_model=32, n_heads=2, n_layers=1)


def test_tied_head_stays_tied_after_to_empty_and_assign_load():
    source = tiny()
    cfg = source.cfg
    with torch.device("meta"):
        empty = GPT(cfg, vocab_size=11)
    empty.to_empty(device="cpu")  # gives each module a tensor of its own
    assert empty.head.weight is empty.tok_emb.weight
    # Model files store the tied weight once (no head.weight): an assigning load must not leave the head behind.
    state = {k: v for k, v in source.state_dict().items() if k != "head.weight"}
    with torch.device("meta"):
        loaded = GPT(cfg, vocab_size=11).eval()
    assert loaded.load_state_dict(state, strict=False, assign=True).missing_keys == ["head.weight"]
    assert loaded.head.weight is loaded.tok_emb.weight
    x = torch.randint(0, 11, (2, 16))
    torch.testing.assert_close(loaded(x)[0], source(x)[0])
    converted = loaded.to(torch.float64)
    assert converted.head.weight is converted.tok_emb.weight and converted.head.weight.dtype == torch.float64


def test_attention_matches_a_hand_written_masked_softmax():
    model = tiny()
    attn, H, hd = model.blocks[0].attn, 4, 8
    x = torch.randn(2, 16, 32)
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(32, dim=-1)
    q, k, v = (t.view(2, 16, H, hd).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(2, 16, 32)
    torch.testing.assert_close(attn(x), y @ attn.proj.weight.T + attn.proj.bias)


def test_attention_of_bf16_on_cpu_is_computed_in_fp32_even_under_autocast():
    q, k, v = (torch.randn(2, 4, 16, 8).bfloat16().requires_grad_() for _ in range(3))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    in_bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # which casts the inputs of a plain SDPA call back to bf16
        y = attention(q, k, v, is_causal=True)
        assert F.scaled_dot_product_attention(q.float(), k.float(), v.float()).dtype == torch.bfloat16
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, exact) and not torch.equal(in_bf16, exact)
    y.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0
    x = torch.randn(2, 4, 16, 8)  # fp32 is left to SDPA as it is
    assert torch.equal(attention(x, x, x, is_causal=True), F.scaled_dot_product_attention(x, x, x, is_causal=True))
    long = torch.randn(1, 1, CPU_FP32_ATTENTION_KEYS + 1, 8).bfloat16()  # where bf16's own kernel is as fast
    assert torch.equal(attention(long, long, long), F.scaled_dot_product_attention(long, long, long))


def test_a_training_step_under_cpu_autocast_tracks_fp32():
    torch.manual_seed(0)
    model = tiny()
    x, y = torch.randint(0, 11, (2, 16)), torch.randint(0, 11, (2, 16))
    _, loss = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, low = model(x, y)
    assert logits.dtype == torch.bfloat16 and low.dtype == torch.float32
    assert abs(low.item() - loss.item()) < 0.02 and low.item() != loss.item()
    low.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_cache_refilled_past_the_context_matches_a_full_forward(pos_emb):
    """Past the context the window slides: the cache is refilled from position 0 (its stale entries beyond the new
    length must not count) and each decoding step must give the logits of one full pass over the window."""
    model = tiny(pos_emb=pos_emb)
    tokens = torch.randint(0, 11, (2, 40))
    cache = model.new_cache(2)
    with torch.inference_mode():
        for end in range(17, 40, 5):  # windows ending past the context: refill with 11 tokens, then decode the rest
            start = end - 16
            cache.length = 0
            model(tokens[:, start : start + 11], cache=cache)
            for t in range(start + 11, end):
                step = model.decode_step(tokens[:, t], cache)
                torch.testing.assert_close(step, model(tokens[:, start : t + 1])[0][:, -1], atol=1e-5, rtol=1e-4)


def test_init_stds_follow_gpt2():
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=128, n_heads=4, n_layers=8, ff_dim=512, seq_len=64), vocab_size=300)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):  # residual projections: 0.02 / sqrt(2 * n_layers)
            assert p.std().item() == pytest.approx(0.005, rel=0.03), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.03), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:  # norm gains
            assert torch.equal(p, torch.ones_like(p)), name


def test_flops_per_token_against_a_hand_count():
    """6 FLOPs per parameter per token (2 forward, 4 backward) plus the attention scores: per layer and token,
    q.k over the whole context and the weighted sum of values, 2 * 2 * width * context forward, tripled."""
    cfg = ModelConfig(d_model=32, n_heads=4, n_layers=2, ff_dim=64, seq_len=16)
    model = GPT(cfg, vocab_size=11)
    idx = torch.randint(0, 11, (3, 16))
    with FlopCounterMode(display=False) as counter:  # counts the linear layers' products (not attention's on CPU)
        model(idx, idx)[1].backward()
    in_products = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "pos_emb.weight")
    assert counter.get_total_flops() == 6 * in_products * idx.numel()
    n_layers, forward = 2, 2 * 2 * 32 * 16
    attention = n_layers * 3 * forward
    # The formula's 6N also counts the parameters in no product (positions, biases, norms): 6 FLOPs each.
    assert flops_per_token(cfg, model.num_params()) == 6 * model.num_params() + attention
