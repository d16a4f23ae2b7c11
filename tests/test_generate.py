"""Text generation: sampling options, beam search, the KV cache and sliding window, and the command line."""

from __future__ import annotations

import dataclasses
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxtrain import GPT, ModelConfig, load_model, sampling, save_model_file
from fluxtrain.errors import FluxtrainError
from fluxtrain.generate import (
    SAMPLING_OPTIONS,
    TextStream,
    build_parser,
    encode_prompt,
    load_for_generation,
    main,
    printed_context,
    start_ids,
)
from fluxtrain.runs import resolve_model_path
from fluxtrain.sampling import (
    BeamStream,
    ContextWindow,
    SamplingConfig,
    apply_repetition_penalty,
    beam_search,
    filter_logits,
    generate,
    generate_ids,
    next_token_probs,
    pick_next,
    sample_stream,
    sequence_logprob,
)
from fluxtrain.tokenizer import BPETokenizer, CharTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 16
TEXT = "ROMEO:\nthe king my lord, good sir; love death night sweet heart.\nJULIET:\nwhy come go speak hear thou art!\n"


def tiny_model(seed: int = 0, weight_std: float = 0.3, **overrides) -> GPT:
    """A random 2-layer model. Weights wider than the training init spread the logits, so that greedy output
    follows the context instead of repeating one token, and cache or window mistakes change it."""
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=SEQ_LEN, **overrides)
    model = GPT(cfg, CharTokenizer.train(TEXT).vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, weight_std)
    return model


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


@pytest.fixture
def model_file(tmp_path: Path, model: GPT) -> Path:
    path = tmp_path / "run" / "model_final.safetensors"
    save_model_file(path, model, CharTokenizer.train(TEXT))
    return path


def greedy(n: int, **kw) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=n, temperature=0.0, **kw)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Sampling options


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    expected = generate(model, [1, 2, 3], greedy(40))
    for seed in range(3):
        top_k_1 = SamplingConfig(max_new_tokens=40, temperature=1.5, top_k=1)
        assert generate(model, [1, 2, 3], top_k_1, seeded(seed)) == expected
        top_p_tiny = SamplingConfig(max_new_tokens=40, temperature=1.5, top_k=0, top_p=1e-6)
        assert generate(model, [1, 2, 3], top_p_tiny, seeded(seed)) == expected


def test_temperature_zero_is_deterministic_and_seed_makes_sampling_reproducible(model):
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.0)
    outputs = {tuple(generate(model, [4, 5], cfg, seeded(seed))) for seed in range(5)}
    assert len(outputs) == 1
    sampled = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=0)
    assert generate(model, [4, 5], sampled, seeded(7)) == generate(model, [4, 5], sampled, seeded(7))
    assert len({tuple(generate(model, [4, 5], sampled, seeded(seed))) for seed in range(5)}) > 1


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 1.0, 2.0):
        probs = next_token_probs(logits, SamplingConfig(temperature=t, top_k=0))
        assert torch.allclose(probs, torch.softmax(logits / t, dim=-1))
    entropy = [
        -(p * p.log()).sum().item()
        for p in (next_token_probs(logits, SamplingConfig(temperature=t, top_k=0)) for t in (0.5, 1.0, 2.0))
    ]
    assert entropy[0] < entropy[1] < entropy[2]


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan(model):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 3.0, -7.0]])
    for t in (5e-324, 1e-46, 1e-45, 1e-30, 1e-8):  # below 1e-45 the temperature is 0 in float32
        probs = next_token_probs(logits, SamplingConfig(temperature=t, top_k=0))
        assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]]))
    for t in (1e-40, 1e-50):
        tiny = SamplingConfig(max_new_tokens=30, temperature=t, top_k=0)
        assert generate(model, [4, 5], tiny, seeded(3)) == generate(model, [4, 5], greedy(30))


def test_top_k_keeps_the_k_most_likely_in_proportion():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0]])
    probs = next_token_probs(logits, SamplingConfig(temperature=1.0, top_k=2))[0]
    assert (probs > 0).tolist() == [False, True, False, True, False]
    assert probs[1] / probs[3] == pytest.approx(math.exp(3.0 - 2.0))
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    for top_p, kept in ((0.4, [1]), (0.75, [1, 3]), (0.9, [1, 2, 3]), (1.0, [0, 1, 2, 3])):
        out = next_token_probs(logits, SamplingConfig(temperature=1.0, top_k=0, top_p=top_p))[0]
        assert torch.nonzero(out).flatten().tolist() == kept, top_p
        assert torch.allclose(out[kept], probs[0, kept] / probs[0, kept].sum())
    assert torch.equal(filter_logits(logits, 0, 1.0), logits)


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 1.5]).repeat(40_000, 1)
    cfg = SamplingConfig(temperature=0.8, top_k=3)
    draws = pick_next(logits, cfg, seeded(0), None)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    expected = next_token_probs(logits[:1], cfg)[0]
    assert freq[1] == 0 and freq[3] == 0
    assert torch.allclose(freq, expected, atol=0.01)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, False]])
    r = 1.3
    out = apply_repetition_penalty(logits, seen, r)
    assert out[0].tolist() == pytest.approx([2.0 / r, -1.0 * r, 2.0, -1.0, 0.5])
    # The probability of a repeated token against an unseen one with the same logit falls by exp(l/r - l).
    base = next_token_probs(logits, SamplingConfig(temperature=1.0, top_k=0))[0]
    penalized = next_token_probs(logits, SamplingConfig(temperature=1.0, top_k=0, repetition_penalty=r), seen)[0]
    assert base[0] / base[2] == pytest.approx(1.0)
    assert penalized[0] / penalized[2] == pytest.approx(math.exp(2.0 / r - 2.0))
    assert penalized[1] / penalized[3] == pytest.approx(math.exp(-1.0 * r + 1.0))


def test_the_largest_repetition_penalty_still_picks_the_most_likely_token():
    """Every token seen, every logit negative: the least negative is still the most likely. A penalty past float32's
    range (1e39) made all of them -inf, so sampling drew from NaN and greedy took id 0; it is refused."""
    logits = torch.tensor([[-2.0, -0.5, -1.0, -3.0]])
    seen = torch.ones_like(logits, dtype=torch.bool)
    cfg = SamplingConfig(temperature=1.0, top_k=0, repetition_penalty=sampling.MAX_REPETITION_PENALTY)
    assert pick_next(logits, dataclasses.replace(cfg, temperature=0.0), None, seen).tolist() == [1]
    assert next_token_probs(logits, cfg, seen)[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    with pytest.raises(
        FluxtrainError, match=r"^repetition_penalty=1e\+39 must be a number from 1 to 10000 \(1 = off\)$"
    ):
        dataclasses.replace(cfg, repetition_penalty=1e39).validate()


def test_repetition_penalty_reduces_repeats_in_generated_text(model):
    plain = generate(model, [1], greedy(30))
    penalized = generate(model, [1], greedy(30, repetition_penalty=5.0))
    assert penalized != plain
    assert len(set(penalized)) > len(set(plain))


def test_sampling_settings_are_validated():
    for bad in (
        dict(temperature=2.5),
        dict(temperature=-0.1),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.5),
        dict(beams=0),
        dict(max_new_tokens=0),
        dict(context_shift=0),
        dict(temperature=math.nan),
        dict(top_p=math.nan),
        dict(top_p=math.inf),
        dict(repetition_penalty=math.nan),
        dict(repetition_penalty=math.inf),
        dict(repetition_penalty=1e300),
    ):
        with pytest.raises(FluxtrainError):
            SamplingConfig(**bad).validate(SEQ_LEN)
    with pytest.raises(FluxtrainError, match=r"^context_shift=17 must be between 1 and model.seq_len=16$"):
        SamplingConfig(context_shift=SEQ_LEN + 1).validate(SEQ_LEN)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(temperature="hot"), "temperature='hot' must be between 0 and 2 (0 = greedy)"),
        (dict(max_new_tokens="5"), "max_new_tokens='5' must be a positive integer"),  # a text, not the number 5
        (dict(top_k=2.5), "top_k=2.5 must be an integer >= 0 (0 = off)"),
        (dict(beams=True), "beams=True must be an integer from 1 to 100 (1 = no beam search)"),
        (dict(top_p=None), "top_p=None must be in (0, 1] (1 = off)"),
    ],
)
def test_a_sampling_setting_of_the_wrong_type_is_named_not_a_type_error(settings, message):
    with pytest.raises(FluxtrainError) as info:
        SamplingConfig(**settings).validate(SEQ_LEN)
    assert str(info.value) == message


def test_the_python_api_names_a_bad_prompt_token_id_or_device(model, tmp_path):
    cfg, g = SamplingConfig(max_new_tokens=3, temperature=0), torch.Generator().manual_seed(0)
    as_list = generate(model, [1, 2], cfg, g)
    assert generate(model, torch.tensor([1, 2]), cfg, g) == as_list  # a 1-D tensor of ids will do
    with pytest.raises(FluxtrainError, match=r"^the prompt holds text, not token ids: encode it first"):
        generate(model, [1, "a"], cfg, g)
    with pytest.raises(FluxtrainError, match=r"^the prompt holds text, not token ids"):
        generate(model, list("ROMEO:"), cfg, g)
    with pytest.raises(FluxtrainError, match="^the prompt must be a list of token ids, not str$"):
        generate(model, "ab", cfg, g)
    with pytest.raises(FluxtrainError, match=r"^the prompt is a tensor of shape \(1, 2\): give one sequence"):
        generate(model, torch.tensor([[1, 2]]), cfg, g)
    with pytest.raises(FluxtrainError, match=r"^beams='2' must be an integer from 1 to 100"):
        generate(model, [1, 2], SamplingConfig(beams="2"), g)  # checked before beam search is chosen
    with pytest.raises(FluxtrainError, match=r"^the sampling settings must be a SamplingConfig, not dict$"):
        generate(model, [1, 2], {"temperature": 0}, g)
    with pytest.raises(FluxtrainError, match=r"^generator must be a torch.Generator \(or None\), not int$"):
        generate(model, [1, 2], SamplingConfig(max_new_tokens=3), 1)
    # numpy's scalars are numbers like Python's: a setting read from an array works
    numpy_cfg = SamplingConfig(max_new_tokens=np.int64(3), temperature=np.float32(0.0))
    assert generate(model, [1, 2], numpy_cfg, g) == as_list
    tokenizer = CharTokenizer.train("abcdef")
    assert tokenizer.decode([0, 5]) == "af"
    for bad in (6, -1, np.int64(6), torch.tensor(-1)):
        with pytest.raises(FluxtrainError, match=r"is not in the vocabulary \(ids 0 to 5\)$"):
            tokenizer.decode([0, bad])
    for bad in ("a", 1.0, True, np.bool_(True), torch.tensor(True), torch.tensor(1.0)):
        with pytest.raises(FluxtrainError, match=r"^token id .* is not an integer$"):
            tokenizer.decode([0, bad])
    for batch in (torch.tensor([[0, 5]]), np.array([[0, 5]]), torch.tensor(3)):  # a batch's row, not the batch
        with pytest.raises(FluxtrainError, match=r"^token ids must be one sequence \(1-D\), not an array of shape"):
            tokenizer.decode(batch)
    assert tokenizer.decode(torch.tensor([0, 5])) == tokenizer.decode(np.array([0, 5])) == "af"
    if not torch.cuda.is_available():
        with pytest.raises(FluxtrainError, match="^device=cuda: CUDA is not available on this machine$"):
            load_model(tmp_path / "any.safetensors", "cuda")


def test_sampling_errors_name_the_field_or_the_name_given_for_it(model):
    """From Python an error names the field; `names` shows it as the user set it (a flag, a session command)."""
    with pytest.raises(FluxtrainError, match=r"^beams=0 must be an integer from 1 to 100 \(1 = no beam search\)$"):
        SamplingConfig(beams=0).validate()
    with pytest.raises(FluxtrainError, match=r"^--beams 0 must be an integer from 1 to 100"):
        SamplingConfig(beams=0).validate(names={"beams": "--beams"})
    with pytest.raises(FluxtrainError, match=r"^/topk -1 must be an integer >= 0"):
        SamplingConfig(top_k=-1).validate(names={"top_k": "/topk"})
    with pytest.raises(FluxtrainError, match=r"^top_k=-1 must be"):  # a field missing from `names` keeps its own
        SamplingConfig(top_k=-1).validate(names={"beams": "--beams"})
    with pytest.raises(FluxtrainError, match=r"^temperature=3.0 must be between 0 and 2"):
        generate_ids(model, [0], 5, temperature=3.0)  # the trainer's samples


# Beam search


def test_one_beam_equals_greedy(model):
    for prompt in ([1], [3, 4, 5], list(range(20))):
        assert beam_search(model, prompt, SamplingConfig(max_new_tokens=30, beams=1))[0] == generate(
            model, prompt, greedy(30)
        )


def test_beams_score_at_least_as_well_as_greedy(model):
    shift = SEQ_LEN // 4
    for prompt in ([1], [7, 8], [2, 9, 11, 3]):
        greedy_ids = generate(model, prompt, greedy(24))
        greedy_score = sequence_logprob(model, prompt, greedy_ids, shift)
        for beams in (2, 4):
            ids, score = beam_search(model, prompt, SamplingConfig(max_new_tokens=24, beams=beams))
            assert len(ids) == 24
            assert score == pytest.approx(sequence_logprob(model, prompt, ids, shift), abs=1e-3)
            assert score >= greedy_score - 1e-4, (prompt, beams)


def test_beam_stream_gives_each_token_of_the_best_beam_once_every_beam_holds_it(model, monkeypatch):
    steps = []  # the beams after each step, as the stream's search goes
    beam_steps = sampling._beam_steps

    def recorded(*args, **kwargs):
        settled = []
        for state in beam_steps(*args, **kwargs):
            settled += state.settled
            steps.append(torch.tensor([settled + state.tree.path(beam) for beam in range(len(state.scores))]))
            yield state

    monkeypatch.setattr(sampling, "_beam_steps", recorded)
    for prompt, penalty in (([1], 1.0), ([7, 8], 1.0), ([2, 9, 11, 3], 1.3)):
        for beams in (2, 4):
            cfg = SamplingConfig(max_new_tokens=40, beams=beams, repetition_penalty=penalty)
            steps.clear()
            shown_at = []  # how many steps had run when each token came
            ids = []
            for token in BeamStream(model, prompt, cfg):
                shown_at.append(len(steps))
                ids.append(token)
            assert ids == beam_search(model, prompt, cfg)[0], (prompt, beams)
            for i, (token, n) in enumerate(zip(ids, shown_at, strict=True)):
                if n < cfg.max_new_tokens:  # during the search: every beam held it when it came
                    assert (steps[n - 1][:, i] == token).all(), (prompt, beams, i)
            assert shown_at.count(cfg.max_new_tokens) < cfg.max_new_tokens, (prompt, beams)  # not all at the end


def naive_beam_search(model: GPT, prompt: list[int], n: int, beams: int, shift: int) -> tuple[list[int], float]:
    """Beam search the plain way: every beam keeps its whole text, and each step runs each beam's whole window
    (the rule of `naive_greedy`) through the model."""
    found = [([], 0.0)]  # (new tokens, total log-probability), best first
    for _ in range(n):
        candidates = []
        for new, score in found:
            ids = prompt + new
            start = max(0, len(prompt) - SEQ_LEN)
            for length in range(len(prompt) + 1, len(ids) + 1):  # the window's start, slid as decoding slides it
                if length - start > SEQ_LEN:
                    start = length - (SEQ_LEN + 1 - shift)
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids[start:]]))
            logprobs = torch.log_softmax(logits[0, -1].double(), dim=-1)
            candidates += [(new + [token], score + float(logprobs[token])) for token in range(model.vocab_size)]
        found = sorted(candidates, key=lambda c: -c[1])[:beams]
    return found[0]


@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_equals_the_plain_search(model, beams):
    """Past the context window too."""
    n = 3 * SEQ_LEN
    for prompt in ([1], [2, 9, 11, 3]):
        cfg = SamplingConfig(max_new_tokens=n, beams=beams)
        ids, score = beam_search(model, prompt, cfg)
        plain_ids, plain_score = naive_beam_search(model, prompt, n, beams, cfg.shift_for(SEQ_LEN))
        assert ids == plain_ids, (prompt, beams)
        assert score == pytest.approx(plain_score, abs=1e-3)


@pytest.mark.parametrize("merge", [0.0, 0.3, 0.9])
def test_the_beam_tree_keeps_every_beam_and_settles_up_to_their_last_common_ancestor(merge):
    """Random searches, whose beams share an ancestor often or never (merge 0: each beam grows from itself). After
    every step the settled tokens are exactly those up to the beams' last common ancestor."""
    rng = np.random.default_rng(int(merge * 10))
    n_beams, n_steps = 4, 600
    tree = sampling.BeamTree(n_beams)
    beams = [[] for _ in range(n_beams)]  # each beam's tokens
    lineages = [[] for _ in range(n_beams)]  # each beam's ancestors, as (step, row) from the first step on
    for step in range(n_steps):
        rows = np.where(rng.random(n_beams) < merge, rng.integers(n_beams, size=n_beams), np.arange(n_beams))
        ids = rng.integers(50, size=n_beams)
        tree.add(rows, ids)
        beams = [beams[r] + [int(t)] for r, t in zip(rows, ids, strict=True)]
        lineages = [lineages[r] + [(step, j)] for j, r in enumerate(rows)]
        assert [tree.settled_tokens + tree.path(b) for b in range(n_beams)] == beams
        shared = next((i for i in range(step + 1) if len({lineage[i] for lineage in lineages}) > 1), step + 1)
        assert len(tree.settled_tokens) == shared, step
    assert (len(tree.settled_tokens) == 0) == (merge == 0.0)  # merge 0: the beams grew apart at the first step
    if merge:
        assert len(tree.parents) <= 256  # the settled steps' back-pointers are let go


def test_the_beam_tree_settles_an_ancestor_shared_by_beams_that_split_after_it():
    """All beams come to descend from two beams that grew from one beam after the last settling: that beam's token is
    settled then."""
    tree, out = sampling.BeamTree(3), []
    out += tree.add(np.array([0, 0, 0]), np.array([10, 11, 12]))
    out += tree.add(np.array([0, 0, 1]), np.array([20, 21, 22]))
    out += tree.add(np.array([0, 0, 1]), np.array([30, 31, 32]))  # all grow from 10; 30 and 31 from 20
    for _ in range(50):  # from now on, every beam descends from 30 or 31
        out += tree.add(np.array([0, 1, 0]), np.array([40, 41, 42]))
    assert out == [10, 20]


# KV cache and the sliding window


def naive_greedy(model: GPT, prompt: list[int], n: int, shift: int) -> list[int]:
    """Greedy decoding the plain way: the whole window through the model for every token, with the documented
    window rule written out (a prompt keeps its last seq_len tokens; a full window drops its oldest `shift`)."""
    ids = list(prompt)
    start = max(0, len(ids) - SEQ_LEN)
    for _ in range(n):
        if len(ids) - start > SEQ_LEN:
            start = len(ids) - (SEQ_LEN + 1 - shift)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[start:]]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("shift", [1, None, SEQ_LEN])
@pytest.mark.parametrize("prompt_len", [3, SEQ_LEN, 3 * SEQ_LEN + 5])
def test_greedy_with_cache_equals_without_past_the_context(model, shift, prompt_len):
    prompt = [(7 * i + 3) % model.vocab_size for i in range(prompt_len)]
    cfg = greedy(4 * SEQ_LEN, context_shift=shift)
    cached = generate(model, prompt, cfg)
    uncached = generate(model, prompt, cfg, use_cache=False)
    assert cached == uncached
    assert cached == naive_greedy(model, prompt, 4 * SEQ_LEN, cfg.shift_for(SEQ_LEN))


def test_cached_and_uncached_logits_agree(model):
    """Not only the argmax: the next-token logits of both paths agree at every step, past several slides."""
    windows = [ContextWindow(model, 1, shift=5, use_cache=c) for c in (True, False)]
    logits = [w.prefill(torch.tensor([[1, 2, 3]])) for w in windows]
    with torch.inference_mode():
        for step in range(70):
            assert torch.allclose(logits[0], logits[1], atol=1e-5), step
            token = logits[0].argmax(dim=-1)
            logits = [w.append(token) for w in windows]


def test_the_cache_holds_the_positions_generation_needs_and_beams_reorder_only_those(model, monkeypatch):
    """No more than the prompt and the new tokens, up to the context: a short continuation of a long-context model
    with many beams allocates little, and beam search copies only the cached positions when it reorders."""
    assert ContextWindow(model, 3, shift=4, positions=5).cache.kv[0].shape == (2, 3, 2, 5, 16)
    assert ContextWindow(model, 3, shift=4, positions=10 * SEQ_LEN).cache.kv[0].shape == (2, 3, 2, SEQ_LEN, 16)
    # Told of its positions or not, a window gives the same logits, also past the context.
    logits = []
    for positions in (None, 3 + 3 * SEQ_LEN):
        window = ContextWindow(model, 1, shift=5, positions=positions)
        steps = [window.prefill(torch.tensor([[1, 2, 3]]))]
        with torch.inference_mode():
            steps += [window.append(torch.tensor([i % 7])) for i in range(3 * SEQ_LEN)]
        logits.append(torch.stack(steps))
    assert torch.equal(logits[0], logits[1])
    copied = []
    real_index_select = torch.Tensor.index_select
    monkeypatch.setattr(
        torch.Tensor, "index_select", lambda t, *a: copied.append(t.size(-2)) or real_index_select(t, *a)
    )
    beam_search(model, [1, 2, 3], SamplingConfig(max_new_tokens=4, beams=3))
    assert set(copied) - {3} <= {4, 5, 6}  # the kv cache's positions: 3 prompt tokens, then one more per step


def test_each_cached_token_costs_one_position(model):
    prompt, n = [1, 2, 3, 4], 10  # fits in the context: no slide
    cached = ContextWindow(model, 1, shift=4)
    uncached = ContextWindow(model, 1, shift=4, use_cache=False)
    with torch.inference_mode():
        for window in (cached, uncached):
            window.prefill(torch.tensor([prompt]))
            for token in range(n - 1):
                window.append(torch.tensor([token]))
    assert cached.n_forward_positions == len(prompt) + n - 1
    assert uncached.n_forward_positions == sum(range(len(prompt), len(prompt) + n))


def test_rope_model_slides_too():
    model = tiny_model(pos_emb="rope")
    cfg = greedy(3 * SEQ_LEN)
    assert generate(model, [1, 2], cfg) == generate(model, [1, 2], cfg, use_cache=False)


def test_generate_ids_for_the_trainer(model):
    ids = generate_ids(model, [1, 2], 20, temperature=1.0, top_k=40, generator=seeded(0))
    assert len(ids) == 20 and all(0 <= i < model.vocab_size for i in ids)
    assert generate_ids(model, [1, 2], 0) == []


def test_the_stream_draws_what_a_plain_sampling_loop_draws(model):
    """Against a loop that reruns the whole text through the model for every token (no cache; 15 new tokens fit
    the context), penalizing the prompt and every token drawn so far."""
    cfg = SamplingConfig(max_new_tokens=15, temperature=0.9, top_p=0.9, repetition_penalty=1.2)
    ids, generator = [5], seeded(3)
    with torch.no_grad():
        for _ in range(cfg.max_new_tokens):
            seen = torch.zeros(1, model.vocab_size, dtype=torch.bool)
            seen[0, ids] = True
            probs = next_token_probs(model(torch.tensor([ids]))[0][:, -1], cfg, seen)
            ids.append(int(torch.multinomial(probs, 1, generator=generator)))
    assert list(sample_stream(model, [5], cfg, seeded(3))) == ids[1:]


def test_decoding_turns_dropout_off_and_leaves_the_model_in_its_mode():
    dropped = tiny_model(dropout=0.5)
    expected = generate(dropped, [1, 2, 3], greedy(30))
    dropped.train()
    assert generate(dropped, [1, 2, 3], greedy(30)) == expected
    beams = SamplingConfig(max_new_tokens=10, beams=3)
    assert beam_search(dropped, [1, 2, 3], beams) == beam_search(dropped.eval(), [1, 2, 3], beams)
    dropped.train()
    stream = sample_stream(dropped, [1, 2, 3], greedy(30))
    assert next(stream) == expected[0] and dropped.training  # between tokens the caller's mode is back
    assert [next(stream) for _ in range(29)] == expected[1:]
    assert sequence_logprob(dropped, [1, 2, 3], expected, 4) == sequence_logprob(dropped.eval(), [1, 2, 3], expected, 4)


def test_decoding_a_training_model_switches_its_mode_once_not_per_token(monkeypatch):
    """The trainer's periodic samples decode its model while it is in training mode; each mode switch walks every
    module, so it happens around the whole call, not around each of the 30 tokens."""
    dropped = tiny_model(dropout=0.5).train()
    modes = []  # Module.eval() is train(False)
    monkeypatch.setattr(dropped, "train", lambda mode=True: modes.append(mode) or GPT.train(dropped, mode))
    expected = generate(tiny_model(dropout=0.5), [1, 2, 3], greedy(30))
    assert generate_ids(dropped, [1, 2, 3], 30, temperature=0.0) == expected
    assert modes == [False, True] and dropped.training


# Prompts and text


def test_unknown_characters_are_named_or_dropped():
    tokenizer = CharTokenizer.train(TEXT)
    with pytest.raises(FluxtrainError, match=r"'é', 'ü'.*--drop-unknown"):
        encode_prompt(tokenizer, "ROMEO ü é", drop_unknown=False)
    text, ids, note = encode_prompt(tokenizer, "ROMEO ü é", drop_unknown=True)
    assert text == "ROMEO  " and tokenizer.decode(ids) == text and note == "left out of the prompt: 'é', 'ü'"
    assert encode_prompt(tokenizer, "ROMEO", drop_unknown=False) == ("ROMEO", tokenizer.encode("ROMEO"), "")


def test_an_exported_char_tokenizer_names_or_drops_the_characters_it_lacks():
    from fluxtrain.export import char_tokenizers_model

    tokenizer = BPETokenizer(char_tokenizers_model(CharTokenizer.train(TEXT).chars))  # as tokenizer.path
    with pytest.raises(FluxtrainError, match=r"'é', 'ü'.*--drop-unknown"):
        encode_prompt(tokenizer, "ROMEO ü é", drop_unknown=False)
    text, ids, note = encode_prompt(tokenizer, "ROMEO ü é", drop_unknown=True)
    assert text == "ROMEO  " and tokenizer.decode(ids) == text and note == "left out of the prompt: 'é', 'ü'"


def test_characters_read_as_the_unknown_token_are_named_or_dropped(capsys, tmp_path):
    """A tokenizer with an unknown token encodes any character: those it reads as that token are said, or dropped."""
    from tokenizers import Tokenizer, models

    unigram = BPETokenizer(Tokenizer(models.Unigram([("<unk>", 0.0), ("w", -1.0), ("h", -1.0), ("y", -1.0)], 0)))
    for tokenizer in (metaspace_tokenizer(), unigram):  # <unk> is id 0 in both
        text, ids, note = encode_prompt(tokenizer, "日why本日", drop_unknown=False)
        assert (text, note) == (
            "日why本日",
            "2 prompt character(s) are not in the vocabulary and read as <unk>: "
            "'日', '本' (--drop-unknown leaves them out)",
        )
        assert ids == tokenizer.encode(text) and 0 in ids
        assert encode_prompt(tokenizer, "日why本日", drop_unknown=True) == (
            "why",
            tokenizer.encode("why"),
            "left out of the prompt: '日', '本'",
        )
        assert encode_prompt(tokenizer, "why", drop_unknown=False) == ("why", tokenizer.encode("why"), "")
    _, path = model_file_for(metaspace_tokenizer(), tmp_path / "model.safetensors")
    code, out, err = run_main(capsys, str(path), "--prompt", "日 why", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("日 why") and "\n1 prompt character(s) are not in the vocabulary" in err
    code, out, err = run_main(capsys, str(path), "--prompt", "日 why", "--max-new-tokens", "3", "--drop-unknown")
    assert code == 0 and out.startswith(" why") and err.endswith("\nleft out of the prompt: '日'\n")


def test_a_prompt_that_is_not_utf8_is_named(capsys, monkeypatch, model_file):
    bad = b"AB\xffC".decode("utf-8", "surrogateescape")  # how Python hands undecodable argv and stdin bytes over
    with pytest.raises(FluxtrainError, match=r"^the prompt is not valid UTF-8 \(character 3 is a bad byte\)$"):
        encode_prompt(CharTokenizer.train(TEXT), bad, drop_unknown=True)
    code, out, err = run_main(capsys, str(model_file), "--prompt", bad, "--max-new-tokens", "5")
    assert (code, out) == (1, "") and err == "error: the prompt is not valid UTF-8 (character 3 is a bad byte)\n"
    # On stdin too, where a UTF-8 locale's strict decoding would stop with a UnicodeDecodeError.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"AB\xffC"), encoding="utf-8"))
    assert run_main(capsys, str(model_file), "--max-new-tokens", "5") == (1, out, err)


def test_text_stream_holds_back_incomplete_characters():
    class ByteTokenizer:
        vocab_size = 256

        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in "aé\nz€".encode()]
    assert pieces == ["a", "", "é", "\n", "z", "", "", "€"]
    # A byte that never completes a character is printed (as U+FFFD) at the end, as a single decode would.
    assert [stream.push(b) for b in b"x\xe2"] == ["x", ""] and stream.flush() == "\ufffd"
    # A continuation is decoded after the prompt's last ids that make whole characters.
    assert printed_context(ByteTokenizer(), "aé", list("aé".encode())) == list("é".encode())
    stream = TextStream(ByteTokenizer(), list("é".encode()))
    assert [stream.push(b) for b in "€".encode()] == ["", "", "€"]


def test_text_stream_decodes_a_few_ids_per_token_however_long_the_line():
    """A line of 3,000 tokens decodes a few ids per token, not the whole line each time (30 s for 20,000 BPE tokens
    without a newline), and a decoder that drops the text's leading space still gives the text of one decode."""

    class WordTokenizer:  # "▁word" pieces, decoded like sentencepiece's Metaspace: no space at the very start
        pieces = ["▁the", "▁king", "ly", "▁lord"]
        decoded_ids = 0

        def decode(self, ids: list[int]) -> str:
            self.decoded_ids += len(ids)
            return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")

    tokenizer = WordTokenizer()
    ids = [i % 4 for i in range(3000)]
    stream = TextStream(tokenizer)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert tokenizer.decoded_ids < 10 * len(ids)
    assert text == tokenizer.decode(ids) and text.startswith("the kingly lord the")


def test_closed_stdin_or_stdout(capsys, monkeypatch, model_file):
    """`<&-` is an empty prompt (as /dev/null is), `>&-` a one-line error, not a traceback."""
    n = ["--max-new-tokens", "6", "--temperature", "0"]
    empty = run_main(capsys, str(model_file), "--prompt", "", *n)
    monkeypatch.setattr(sys, "stdin", None)
    assert run_main(capsys, str(model_file), *n)[:2] == empty[:2]
    assert run_main(capsys, str(model_file), "--interactive", *n) == (
        1,
        "",
        "error: --interactive reads prompts from stdin, which is closed\n",
    )
    monkeypatch.setattr(sys, "stdout", None)
    assert main([str(model_file), "--prompt", "the", *n]) == 1
    assert capsys.readouterr().err == "error: stdout is closed: there is nowhere to write the text\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_a_full_disk_is_a_one_line_error(capsys, monkeypatch, model_file, stream):
    with open("/dev/full", "w") as full:  # every write fails with ENOSPC
        monkeypatch.setattr(sys, "stdout", full)
        code = main([str(model_file), "--prompt", "the", "--max-new-tokens", "5", stream])
        assert code == 1 and capsys.readouterr().err.endswith(
            "\nerror: cannot write the text to stdout: No space left on device\n"
        )


def test_characters_stdout_cannot_encode_are_escaped(monkeypatch, tmp_path):
    """Under an ASCII locale (`PYTHONIOENCODING=ascii`), a non-ASCII prompt or continuation is written as escapes."""
    text = TEXT + "é日"
    tokenizer = CharTokenizer.train(text)
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=SEQ_LEN), tokenizer.vocab_size)
    save_model_file(tmp_path / "model.safetensors", model, tokenizer)
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    monkeypatch.setattr(sys, "stdout", out)
    args = [str(tmp_path / "model.safetensors"), "--prompt", "é日", "--max-new-tokens", "200", "--seed", "1"]
    assert main(args) == 0
    new = generate(model, tokenizer.encode("é日"), SamplingConfig(max_new_tokens=200), seeded(1))
    expected = "é日" + tokenizer.decode(new) + "\n"
    assert "é" in expected[2:] or "日" in expected[2:]  # the continuation has some too
    assert out.buffer.getvalue().decode("ascii") == expected.encode("ascii", "backslashreplace").decode("ascii")


# MODEL and TOKENIZER on the command line


def test_model_resolution(tmp_path, model):
    tokenizer = CharTokenizer.train(TEXT)
    run = tmp_path / "run"
    save_model_file(run / "model_final.safetensors", model, tokenizer)
    assert resolve_model_path(run) == run / "model_final.safetensors"
    save_model_file(run / "best.safetensors", tiny_model(seed=1), tokenizer)
    assert resolve_model_path(run) == run / "best.safetensors"
    assert resolve_model_path(run / "model_final.safetensors") == run / "model_final.safetensors"
    # The run folder loads its best model, not the final one.
    loaded, _, path = load_for_generation(run)
    assert path == run / "best.safetensors"
    assert torch.equal(loaded.tok_emb.weight, tiny_model(seed=1).tok_emb.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FluxtrainError, match=r"holds no model file .* and no checkpoints"):
        resolve_model_path(tmp_path / "empty")
    with pytest.raises(FluxtrainError, match="does not exist"):
        resolve_model_path(tmp_path / "missing.safetensors")
    with pytest.raises(FluxtrainError, match=r"^MODEL ~no-such-user-9/x: no home folder for ~no-such-user-9$"):
        resolve_model_path("~no-such-user-9/x")


def test_checkpoints_name_a_model_too(tiny_cfg, tmp_path, capsys):
    """A full checkpoint is a MODEL; a run folder without model files falls back to its newest checkpoint."""
    from fluxtrain.train import train

    run = tmp_path / "trained"
    train(tiny_cfg("train.max_iters=20", "train.ckpt_interval=10", "train.eval_interval=10"), run)
    newest = run / "checkpoints" / "iter_000020.ckpt"
    assert newest.is_file() and (run / "checkpoints" / "iter_000010.ckpt").is_file()
    model, tokenizer, path = load_for_generation(newest)
    final, _ = load_model(run / "model_final.safetensors")
    assert path == newest and torch.equal(model.tok_emb.weight, final.tok_emb.weight)
    (run / "best.safetensors").unlink()
    (run / "model_final.safetensors").unlink()
    assert resolve_model_path(run) == newest
    code, out, err = run_main(capsys, str(run), "--prompt", "KING", "--max-new-tokens", "5")
    assert code == 0 and out.startswith("KING") and len(out) == len("KING") + 5 + 1 and str(newest) in err


def test_tokenizer_argument(tmp_path, model_file):
    tokenizer = CharTokenizer.train(TEXT)
    tokenizer.save(tmp_path / "tokenizer.json")
    _, loaded, _ = load_for_generation(model_file, tmp_path / "tokenizer.json")
    assert loaded.chars == tokenizer.chars
    CharTokenizer(list("abc")).save(tmp_path / "small.json")
    with pytest.raises(FluxtrainError, match="has 3 tokens"):
        load_for_generation(model_file, tmp_path / "small.json")
    with pytest.raises(FluxtrainError, match=r"^TOKENIZER: .*nope\.json does not exist"):
        load_for_generation(model_file, tmp_path / "nope.json")
    with pytest.raises(
        FluxtrainError, match=r"^TOKENIZER ~no-such-user-9/t\.json: no home folder for ~no-such-user-9$"
    ):
        load_for_generation(model_file, "~no-such-user-9/t.json")
    for blank in ("", " "):  # not the current folder, nor a file named " "
        with pytest.raises(FluxtrainError, match=r"^TOKENIZER is empty \(give a tokenizer file, or leave it out"):
            load_for_generation(model_file, blank)


# The command line (in process, and once as a real process)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_running_out_of_memory_is_one_line_naming_what_to_lower(capsys, monkeypatch, model_file):
    import fluxtrain.generate as generate_module

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 53687091200 bytes. " * 3)

    monkeypatch.setattr(generate_module, "write_continuation", out_of_memory)
    code, _, err = run_main(capsys, str(model_file), "--prompt", "ROMEO:", "--beams", "100")
    assert code == 1 and "Traceback" not in err
    assert err.endswith(
        "\nerror: out of memory (RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "53687091200 bytes. DefaultCPUAllocator: can't allocate memory: you tried to allocate...); lower --beams or "
        "--max-new-tokens, or use a smaller model\n"
    )


def test_prompt_mode_prints_prompt_and_greedy_continuation(capsys, model, model_file):
    code, out, err = run_main(
        capsys, str(model_file), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40"
    )
    assert code == 0
    tokenizer = CharTokenizer.train(TEXT)
    expected = tokenizer.decode(generate(model, tokenizer.encode("ROMEO:"), greedy(40)))
    assert out == "ROMEO:" + expected + "\n"
    assert "temperature 0.0" in err and "ROMEO" not in err
    assert err.rstrip().endswith("| no seed (deterministic)")  # a seed would change nothing
    code, out_no_stream, _ = run_main(
        capsys, str(model_file), "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "40", "--no-stream"
    )
    assert code == 0 and out_no_stream == out


def test_prompt_mode_seed_and_beams(capsys, model_file, model):
    args = [str(model_file.parent), "--prompt", "the", "--max-new-tokens", "30", "--seed", "5", "--top-p", "0.9"]
    (_, first, err), second = run_main(capsys, *args), run_main(capsys, *args)[1]
    assert first == second and err.rstrip().endswith("| seed 5")
    assert first != run_main(capsys, *args[:-4], "--seed", "6", "--top-p", "0.9")[1]
    code, out, err = run_main(capsys, str(model_file), "--prompt", "the", "--max-new-tokens", "12", "--beams", "3")
    assert err.rstrip().endswith("| no seed (deterministic)")
    tokenizer = CharTokenizer.train(TEXT)
    beam = beam_search(model, tokenizer.encode("the"), SamplingConfig(max_new_tokens=12, beams=3))[0]
    assert code == 0 and out == "the" + tokenizer.decode(beam) + "\n"


def test_stdin_is_the_prompt_when_piped(capsys, monkeypatch, model_file):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("JULIET:\n"))
    code, out, _ = run_main(capsys, str(model_file), "--max-new-tokens", "10", "--temperature", "0")
    assert code == 0 and out.startswith("JULIET:\n") and len(out) == len("JULIET:\n") + 10 + 1


def test_unknown_characters_on_the_command_line(capsys, model_file):
    code, out, err = run_main(capsys, str(model_file), "--prompt", "ROMEO é", "--max-new-tokens", "5")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "'é'" in err and "--drop-unknown" in err
    code, out, err = run_main(capsys, str(model_file), "--prompt", "ROMEO é", "--max-new-tokens", "5", "--drop-unknown")
    assert code == 0 and out.startswith("ROMEO ") and "'é'" in err


def test_an_empty_prompt_starts_from_id_0_without_a_newline_in_the_vocabulary(capsys, monkeypatch, tmp_path):
    import io

    words = "the king my lord good sir love death night sweet heart"  # no newline
    tokenizer = CharTokenizer.train(words)
    assert start_ids(tokenizer) == [0] and start_ids(CharTokenizer.train(TEXT)) == [
        CharTokenizer.train(TEXT).stoi["\n"]
    ]
    torch.manual_seed(0)
    path = tmp_path / "run" / "model_final.safetensors"
    cfg = ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=SEQ_LEN)
    save_model_file(path, GPT(cfg, tokenizer.vocab_size).eval(), tokenizer)
    n = ["--max-new-tokens", "7", "--temperature", "0"]
    code, out, err = run_main(capsys, str(path), "--prompt", "", *n)
    assert (code, err.count("error")) == (0, 0) and len(out) == 7 + 1 and set(out[:-1]) <= set(words)
    assert run_main(capsys, str(path), "--prompt", "é\n", "--drop-unknown", *n)[:2] == (0, out)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert run_main(capsys, str(path), *n)[:2] == (0, out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--temperature", "3"], "--temperature 3.0 must be between 0 and 2 (0 = greedy)"),
        (["--temperature", "nan"], "--temperature nan must be between 0 and 2"),
        (["--temperature=-inf"], "--temperature -inf must be between 0 and 2"),
        (["--top-k", "-2"], "--top-k -2 must be an integer >= 0 (0 = off)"),
        (["--top-p", "0"], "--top-p 0.0 must be in (0, 1] (1 = off)"),
        (["--top-p", "inf"], "--top-p inf must be in (0, 1]"),
        (["--top-p", "nan"], "--top-p nan must be in (0, 1]"),
        (["--repetition-penalty", "0.5"], "--repetition-penalty 0.5 must be a number from 1 to 10000 (1 = off)"),
        (["--repetition-penalty", "1e300"], "--repetition-penalty 1e+300 must be a number from 1 to 10000"),
        (["--repetition-penalty", "inf"], "--repetition-penalty inf must be a number from 1 to 10000"),
        (["--repetition-penalty", "nan"], "--repetition-penalty nan must be a number from 1 to 10000"),
        (["--beams", "0"], "--beams 0 must be an integer from 1 to 100 (1 = no beam search)"),
        (["--beams", "10000000000"], "--beams 10000000000 must be an integer from 1 to 100"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be a positive integer"),
        (["--seed", "-1"], "--seed -1 must be an integer from 0 to 2**32 - 1"),
        (["--seed", str(2**32)], f"--seed {2**32} must be"),
        (["--context-shift", "0"], "--context-shift 0 must be a positive integer"),
        (["--context-shift", "99"], "--context-shift 99 must be between 1 and model.seq_len=16"),
        (["--device", "tpu"], "--device='tpu'"),
        (["--threads", "0"], "--threads 0 must be from 1 to"),
        (["--threads", "100000"], "--threads 100000 must be from 1 to"),
        (["--threads", str(10**20)], f"--threads {10**20} must be from 1 to"),
        (["--interactive"], "--prompt and --interactive"),
        (["--quantize", "int4"], "--quantize 'int4' is not one of none, int8"),
    ],
)
def test_bad_values_are_one_line_errors(capsys, model_file, argv, message):
    code, out, err = run_main(capsys, str(model_file), "--prompt", "the", *argv)
    assert code == 1 and out == ""
    assert err.startswith(f"error: {message}") and err.count("\n") == 1  # the option first, as the user typed it


def test_each_sampling_setting_is_named_by_its_option():
    """The names errors show for the SamplingConfig fields are the command line's own options."""
    usage = build_parser().format_help()
    assert set(SAMPLING_OPTIONS) == {f.name for f in dataclasses.fields(SamplingConfig)}
    assert all(f" {option} " in usage for option in SAMPLING_OPTIONS.values())
    assert SAMPLING_OPTIONS["top_k"] == "--top-k" and SAMPLING_OPTIONS["max_new_tokens"] == "--max-new-tokens"


def test_bad_model_files_are_one_line_errors(capsys, tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    for name, message in (("missing.safetensors", "does not exist"), ("junk.safetensors", "not a readable")):
        code, out, err = run_main(capsys, str(tmp_path / name), "--prompt", "x")
        assert code == 1 and out == "" and message in err and err.count("\n") == 1


def test_bad_flags_are_one_line_usage_errors(capsys, model_file):
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), "--temperature", "warm"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--temperature" in err and "'warm'" in err


def test_a_prompt_that_starts_with_a_dash_is_shown_how(capsys, model_file):
    with pytest.raises(SystemExit) as exit_info:
        main([str(model_file), "--prompt", "-hello"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a prompt that starts with '-' goes as --prompt=-..." in err
    code, out, err = run_main(capsys, str(model_file), "--prompt=-the", "--drop-unknown", "--max-new-tokens", "3")
    assert code == 0 and "left out of the prompt: '-'" in err and out.startswith("the") and len(out) == 3 + 3 + 1


def test_module_runs_as_a_command(tmp_path, model_file):
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fluxtrain.generate", str(model_file.parent)]
    ok = subprocess.run(
        [*cmd, "--max-new-tokens", "8"], input="JULIET:", capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    assert ok.returncode == 0 and ok.stdout.startswith("JULIET:") and len(ok.stdout) == len("JULIET:") + 8 + 1
    bad = subprocess.run([*cmd, "--prompt", "x", "--top-p", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("error: --top-p 2.0 must be in (0, 1] (1 = off)")
    assert "Traceback" not in bad.stderr


def test_bpe_model_streams_the_same_text_as_one_decode(capsys, tmp_path):
    """Byte-level BPE tokens can end inside a character: the stream holds them back and prints the same text."""
    tokenizer = BPETokenizer.train(TEXT + "é€ naïve café — ünïcödé\n" * 3, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=SEQ_LEN), tokenizer.vocab_size)
    save_model_file(tmp_path / "bpe.safetensors", model, tokenizer)
    args = [str(tmp_path / "bpe.safetensors"), "--prompt", "café ", "--max-new-tokens", "60", "--seed", "2"]
    code, streamed, _ = run_main(capsys, *args)
    assert code == 0
    code, whole, _ = run_main(capsys, *args, "--no-stream")
    assert code == 0 and streamed == whole and streamed.startswith("café ")
    loaded, _ = load_model(tmp_path / "bpe.safetensors")
    cfg = SamplingConfig(max_new_tokens=60)
    assert whole == "café " + tokenizer.decode(generate(loaded, tokenizer.encode("café "), cfg, seeded(2))) + "\n"


def metaspace_tokenizer() -> BPETokenizer:
    """A SentencePiece-style BPE: words start with "▁", which decodes to a space but at the start of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>"], show_progress=False))
    return BPETokenizer(hf)


def model_file_for(tokenizer, path: Path) -> tuple[GPT, Path]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_heads=2, n_layers=2, ff_dim=64, seq_len=SEQ_LEN), tokenizer.vocab_size)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    save_model_file(path, model, tokenizer)
    return model.eval(), path


@pytest.mark.parametrize("kind", ["char", "bpe", "metaspace"])
@pytest.mark.parametrize("argv", [[], ["--no-stream"], ["--beams", "3"], ["--beams", "3", "--no-stream"]])
def test_the_continuation_reads_as_it_does_after_the_prompt(capsys, tmp_path, kind, argv):
    """The new text is decoded after the prompt's last ids: a Metaspace decoder would drop the space before the first
    new word at the start of a text of its own (`whyth` for `why th`)."""
    tokenizers = {
        "char": lambda: CharTokenizer.train(TEXT),
        "bpe": lambda: BPETokenizer.train(TEXT, vocab_size=300),
        "metaspace": metaspace_tokenizer,
    }
    tokenizer = tokenizers[kind]()
    model, path = model_file_for(tokenizer, tmp_path / "model.safetensors")
    code, out, _ = run_main(capsys, str(path), "--prompt", "why", "--max-new-tokens", "12", "--seed", "1", *argv)
    ids = tokenizer.encode("why")
    cfg = SamplingConfig(max_new_tokens=12, beams=3 if "--beams" in argv else 1)
    new = generate(model, ids, cfg, seeded(1))  # beam search with beams > 1
    assert tokenizer.decode(ids) == "why" and (code, out) == (0, tokenizer.decode(ids + new) + "\n")
    if kind == "metaspace":  # the case it is about: the first new token starts a word
        assert out.startswith("why ") and not tokenizer.decode(new).startswith(" ")


def test_an_empty_prompt_or_an_id_outside_the_vocabulary_is_named(model):
    with pytest.raises(FluxtrainError, match="^the prompt is empty: decoding needs at least one token$"):
        generate(model, [], greedy(5))
    with pytest.raises(FluxtrainError, match=f"^prompt token id {model.vocab_size} is outside the model's vocabulary"):
        generate(model, [1, model.vocab_size], greedy(5))
    with pytest.raises(FluxtrainError, match="^prompt token id -1 is outside"):
        beam_search(model, [-1], SamplingConfig(max_new_tokens=5, beams=2))
    for bad in (1.0, True, torch.tensor([True, False])):
        with pytest.raises(FluxtrainError, match=r"^prompt token id (1.0|True) is not an integer \(the model's vocab"):
            generate(model, [1, bad] if not isinstance(bad, torch.Tensor) else bad, greedy(5))


def test_ctrl_c_while_loading_exits_130_with_one_line(capsys, monkeypatch, model_file):
    import fluxtrain.generate as generate_module

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_module, "load_for_generation", interrupted)
    code, out, err = run_main(capsys, str(model_file), "--prompt", "the")
    assert code == 130 and out == "" and err == "interrupted\n"


def test_a_model_name_too_long_is_a_one_line_error(capsys, tmp_path):
    name = str(tmp_path / ("m" * 300))
    code, out, err = run_main(capsys, name, "--prompt", "the")
    assert (code, out, err) == (1, "", f"error: MODEL {name} cannot be read: File name too long\n")


def interrupt_after(tokens, n: int):
    """`tokens` until `n` have come, then Ctrl-C (KeyboardInterrupt)."""
    for i, token in enumerate(tokens):
        if i == n:
            raise KeyboardInterrupt
        yield token


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
@pytest.mark.parametrize("beams", [1, 3])
def test_ctrl_c_prints_the_text_so_far_and_exits_130(capsys, monkeypatch, model, model_file, stream, beams):
    """Stopped after 7 steps, the text is that of 7 new tokens: sampled ones, or with beams the best beam so far."""
    import fluxtrain.generate as generate_module

    if beams > 1:  # Ctrl-C while the model reads the 7th step's tokens
        append, calls = sampling.ContextWindow.append, []

        def interrupted_append(self, next_ids):
            calls.append(1)
            if len(calls) == 7:
                raise KeyboardInterrupt
            return append(self, next_ids)

        monkeypatch.setattr(sampling.ContextWindow, "append", interrupted_append)
    else:
        real_stream = generate_module.sample_stream
        monkeypatch.setattr(generate_module, "sample_stream", lambda *args: interrupt_after(real_stream(*args), 7))
    argv = ["--prompt", "the", "--temperature", "0", "--beams", str(beams), "--max-new-tokens", "40", stream]
    code, out, err = run_main(capsys, str(model_file), *argv)
    monkeypatch.undo()
    tokenizer = CharTokenizer.train(TEXT)
    cfg = SamplingConfig(max_new_tokens=7, temperature=0.0, beams=beams)
    new = generate(model, tokenizer.encode("the"), cfg)  # beam search with beams > 1
    assert (code, out) == (130, "the" + tokenizer.decode(new) + "\n") and err.endswith("\ninterrupted\n")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [True, False])
def test_control_characters_are_escaped_on_a_terminal_only(monkeypatch, model, stream):
    """ESC and the other controls a terminal acts on are shown as escapes there; a pipe or file gets the text as is."""
    import fluxtrain.generate as generate_module

    generated = "\x1b[2J\x1b]0;title\x07ok\tgo\r\n\x7f\x9b\x00"
    tokenizer = CharTokenizer.train(TEXT + generated)
    monkeypatch.setattr(generate_module, "sample_stream", lambda *args: iter(tokenizer.encode(generated)))
    escaped = "\\x1b[2J\\x1b]0;title\\x07ok\tgo\\x0d\n\\x7f\\x9b\\x00"
    for out, expected in ((Terminal(), escaped), (io.StringIO(), generated)):
        monkeypatch.setattr(sys, "stdout", out)
        code = generate_module.print_continuation("\x1b[1m", model, tokenizer, [0], greedy(5), seeded(0), stream)
        assert code == 0
        prompt = "\\x1b[1m" if out.isatty() else "\x1b[1m"
        assert out.getvalue() == prompt + expected + "\n"


def test_messages_stay_out_of_stdout_when_stderr_is_closed(capsys, monkeypatch, model_file):
    """With `2>&-` Python's sys.stderr is None, and print(file=None) would write to stdout."""
    monkeypatch.setattr(sys, "stderr", None)
    code = main([str(model_file), "--prompt", "the", "--max-new-tokens", "5", "--temperature", "0"])
    try:
        assert code == 0 and len(capsys.readouterr().out) == len("the") + 5 + 1
    finally:
        if sys.stderr is not None:
            sys.stderr.close()
