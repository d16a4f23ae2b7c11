"""Decoding: the sliding context window (with or without a KV cache), sampling filters and beam search."""

from __future__ import annotations

import numbers
import operator
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from fluxtrain.errors import FluxtrainError, describe_failure, is_out_of_memory
from fluxtrain.model import GPT, eval_mode
from fluxtrain.tokenizer import Tokenizer, UnknownCharactersError, first_id_outside, is_integer, shown

MAX_TEMPERATURE = 2.0
# Far above any useful penalty (a seen token's logit of -1 becomes -10,000), and small enough that penalized logits
# stay finite in float32: a huge penalty overflows them to +-inf, sampling then draws from NaN, and greedy decoding
# and beam search no longer pick the most likely tokens.
MAX_REPETITION_PENALTY = 1e4
MAX_BEAMS = 100  # beam search holds beams x vocabulary scores and a KV cache per beam: a bound far above any use
# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: a larger one would repeat a smaller one's
# numbers (2**32 and 0 draw the same), so the seeds offered stop there.
MAX_SEED = 2**32 - 1


def _given(setting: str, value: object) -> str:
    """A setting and its value as the user gave them: `--seed 5` for a flag, `/beams 0` for a session command,
    `train.seed=5` for a config key or a field."""
    return f"{setting} {value}" if setting.startswith(("-", "/")) else f"{setting}={value}"


def _is_number(value: Any) -> bool:
    """A real number, numpy's and torch's scalars too, not a bool (True would read as 1)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_seed(seed: int, setting: str) -> None:
    """A seed torch.Generator takes; `setting` is a flag (`--seed`) or a config key (`train.seed`)."""
    if not 0 <= seed <= MAX_SEED:
        raise FluxtrainError(f"{_given(setting, seed)} must be an integer from 0 to 2**32 - 1")


@dataclass
class SamplingConfig:
    """How to pick each next token. The defaults are those of the command line."""

    max_new_tokens: int = 500
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    beams: int = 1  # > 1: beam search (deterministic; temperature, top-k and top-p do not apply)
    context_shift: int | None = None  # tokens dropped when the window is full; None = seq_len // 4

    def validate(self, seq_len: int | None = None, names: Mapping[str, str] | None = None) -> None:
        """Raise FluxtrainError naming the setting and its allowed values; the context shift is checked against
        `seq_len` when given. `names` says how the user set a field (`{"top_k": "--top-k"}` gives `--top-k -1 must
        be ...`); a field not in it is named as itself (`top_k=-1 must be ...`)."""

        def fail(field: str, requirement: str) -> NoReturn:
            setting = names.get(field, field) if names else field
            value = getattr(self, field)
            shown = value if _is_number(value) else repr(value)  # max_new_tokens='5': a text, not the number 5
            raise FluxtrainError(f"{_given(setting, shown)} {requirement}")

        def integer(field: str) -> bool:
            return _is_number(getattr(self, field)) and isinstance(getattr(self, field), numbers.Integral)

        def number(field: str) -> bool:
            return _is_number(getattr(self, field))

        # Written so that NaN fails each check: every comparison with NaN is false.
        if not integer("max_new_tokens") or self.max_new_tokens < 1:
            fail("max_new_tokens", "must be a positive integer")
        if not number("temperature") or not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            fail("temperature", f"must be between 0 and {MAX_TEMPERATURE:g} (0 = greedy)")
        if not integer("top_k") or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 = off)")
        if not number("top_p") or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1] (1 = off)")
        if not number("repetition_penalty") or not 1.0 <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            fail("repetition_penalty", f"must be a number from 1 to {MAX_REPETITION_PENALTY:g} (1 = off)")
        if not integer("beams") or not 1 <= self.beams <= MAX_BEAMS:
            fail("beams", f"must be an integer from 1 to {MAX_BEAMS} (1 = no beam search)")
        if self.context_shift is not None:
            if not integer("context_shift") or self.context_shift < 1:
                fail("context_shift", "must be a positive integer")
            if seq_len is not None and self.context_shift > seq_len:
                fail("context_shift", f"must be between 1 and model.seq_len={seq_len}")

    @property
    def deterministic(self) -> bool:
        """Greedy decoding or beam search: the text does not depend on the random seed."""
        return self.temperature == 0 or self.beams > 1

    def shift_for(self, seq_len: int) -> int:
        return self.context_shift if self.context_shift is not None else max(1, seq_len // 4)


class ContextWindow:
    """The model's view of a growing batch of token sequences: the most recent tokens that fit in its context.

    With learned absolute positions a cached key cannot move to a new position, so a full window cannot drop just
    its oldest token. Instead, when a new token does not fit, the oldest `shift` tokens go at once and the rest are
    fed again from position 0 (a context shift, as llama.cpp does); the next `shift - 1` tokens then cost one
    position each. `shift=1` is the exact sliding window (every token past the context re-reads it). A prompt
    longer than the context keeps its last `seq_len` tokens. Without a cache (`use_cache=False`) every step
    re-reads the same window from scratch, so both paths see exactly the same tokens at the same positions.
    """

    def __init__(self, model: GPT, batch: int, shift: int, use_cache: bool = True, positions: int | None = None):
        """`positions`: how many tokens the window will be fed at most (prompt and new ones), where known; the cache
        and the token buffer then hold no more positions than those."""
        self.model = model
        self.seq_len = model.cfg.seq_len
        assert 1 <= shift <= self.seq_len, f"context shift {shift} outside 1..{self.seq_len}"
        self.shift = shift
        device = model.tok_emb.weight.device
        # The most recent tokens: at least the window, at most twice the context (older ones are never read again);
        # as many as will come where that is fewer.
        size = 2 * self.seq_len if positions is None else min(max(positions, 1), 2 * self.seq_len)
        self.tokens = torch.zeros(batch, size, dtype=torch.long, device=device)
        self.n_tokens = 0
        self.start = 0  # index in `tokens` of the window's first token (at position 0)
        self.cache = model.new_cache(batch, max_len=positions) if use_cache else None
        self.n_forward_positions = 0  # positions run through the model, to show what the cache saves

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Feed the prompt (B, T); return the next-token logits (B, vocab). Only its last `seq_len` tokens count."""
        kept = prompt[:, -self.seq_len :]
        self.tokens[:, : kept.size(1)] = kept
        self.n_tokens = kept.size(1)
        self.start = 0
        return self._read_window()

    def append(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one new token per sequence (B,); return the next-token logits (B, vocab)."""
        if self.n_tokens == self.tokens.size(1) < 2 * self.seq_len:
            raise ValueError(f"the window was told of {self.n_tokens} positions, and is fed more")
        if self.n_tokens == self.tokens.size(1):  # the buffer is full: move the last `seq_len` tokens to its front
            dropped = self.n_tokens - self.seq_len
            self.tokens[:, : self.seq_len] = self.tokens[:, dropped:].clone()
            self.n_tokens, self.start = self.seq_len, self.start - dropped
        self.tokens[:, self.n_tokens] = next_ids
        self.n_tokens += 1
        if self.n_tokens - self.start > self.seq_len:  # the window is full: drop the oldest `shift` tokens
            self.start = self.n_tokens - (self.seq_len + 1 - self.shift)
            return self._read_window()
        if self.cache is None:
            return self._read_window()
        self.n_forward_positions += 1
        with onednn_disabled():
            return self.model.decode_step(next_ids, self.cache).float()

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the sequences `rows` (B,) in this order (beam search)."""
        self.tokens = self.tokens.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)

    def _read_window(self) -> torch.Tensor:
        if self.cache is not None:
            self.cache.length = 0  # the preallocated buffers are refilled from position 0
        return self._forward(self.tokens[:, self.start : self.n_tokens])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n_forward_positions += x.size(1)
        with onednn_disabled():
            logits, _ = self.model(x, cache=self.cache)
        return logits[:, -1].float()  # (B, vocab)


@contextmanager
def onednn_disabled() -> Iterator[None]:
    """Run CPU ops without oneDNN: on the tiny tensors of a decoding step its kernels (GELU's, for one) cost more
    than torch's own (one int8 step of the 6-layer width-384 model of bench/generate.py: 3.7 vs 4.2 ms, measured
    before `GPT.decode_step` took a step below that; bench/README.md has each stage)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def compile_decoding(model: GPT) -> str | None:
    """Make `model.decode_step` a `torch.compile`d function, compiled here for the positions that need a graph of
    their own; None when it compiled, else why not (the eager step then stays).

    The step compiles with dynamic shapes, so a few graphs serve every position (a batch of several sequences, as in
    beam search, compiles once more when it starts). It takes from a few seconds (cached) to about 40 s; after it,
    a step of bench/generate.py's model (6 layers, width 384) with int8 weights takes about 2.6 instead of 3.3 ms on 2
    CPU cores (390 against 303 tokens/s). fp32 weights gain little there: reading them is what takes the time.
    """
    device = model.tok_emb.weight.device
    try:
        compiled = torch.compile(model.decode_step, dynamic=True)  # can fail at once: a backend that will not import
        with torch.inference_mode(), onednn_disabled():  # the tensors decoding passes are inference tensors too
            cache = model.new_cache(1)
            token = torch.zeros(1, dtype=torch.long, device=device)
            # torch.compile specialises sizes of 0 and 1, and the last position's keys fill the whole cache: so
            # positions 1 (after a one-token prompt) and seq_len - 1 get graphs of their own, and position 2 the graph
            # for all the others. A step never runs at position 0: the prompt comes first.
            for position in sorted({1, 2, model.cfg.seq_len - 1} & set(range(1, model.cfg.seq_len))):
                cache.length = position
                compiled(token, cache)
    except Exception as e:  # any compiler failure: decoding still works eagerly
        if is_out_of_memory(e):
            raise
        torch._dynamo.reset()
        return describe_failure(e)
    model.decode_step = compiled
    return None


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: for tokens already in the text (`seen`, bool like logits), divide positive logits by
    `penalty` and multiply negative ones by it."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top `top_k` (0 = all) and outside the nucleus of mass `top_p`.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`; it always holds the
    most likely token, so a tiny `top_p` is greedy decoding.
    """
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop = mass_before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token_probs(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution (B, vocab) the sampler draws from, for temperature > 0; `seen` marks tokens to penalize."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others to -inf (greedy in
    # the limit) instead of every logit to +-inf and the probabilities to nan. A temperature below the smallest normal
    # float would be 0 in the logits' precision (0 / 0 = nan): it divides as that float, which gives the same limit.
    temperature = max(cfg.temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    return torch.softmax(filter_logits(logits, cfg.top_k, cfg.top_p), dim=-1)


def pick_next(
    logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None, seen: torch.Tensor | None
) -> torch.Tensor:
    """One next token per row (B,): argmax when temperature is 0, else a draw from `next_token_probs`."""
    if cfg.temperature == 0:
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, cfg, seen)
    # Draw on the CPU so that a seed gives the same text on every device.
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


def _seen_mask(prompt: list[int], batch: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(batch, vocab_size, dtype=torch.bool, device=device)
    seen[:, torch.tensor(sorted(set(prompt)), dtype=torch.long, device=device)] = True
    return seen


def _check_prompt(model: GPT, prompt: list[int] | torch.Tensor) -> list[int]:
    """The prompt as a list of token ids of the model's vocabulary (a 1-D tensor of them will do)."""
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and not prompt.is_floating_point():
        prompt = prompt.tolist()
    if isinstance(prompt, torch.Tensor) and prompt.dim() != 1:
        shape = tuple(prompt.shape)
        raise FluxtrainError(f"the prompt is a tensor of shape {shape}: give one sequence, a 1-D tensor or a list")
    if not isinstance(prompt, (list, tuple)):
        raise FluxtrainError(f"the prompt must be a list of token ids, not {type(prompt).__name__}")
    if not prompt:
        raise FluxtrainError("the prompt is empty: decoding needs at least one token")
    if any(isinstance(i, str) for i in prompt):
        raise FluxtrainError("the prompt holds text, not token ids: encode it first (tokenizer.encode(text))")
    if (bad := first_id_outside(prompt, model.vocab_size)) is not None:
        vocab = f"the model's vocabulary of {model.vocab_size}"
        problem = f"is not an integer ({vocab})" if not is_integer(prompt[bad]) else f"is outside {vocab}"
        raise FluxtrainError(f"prompt token id {shown(prompt[bad])!r} {problem}")
    if isinstance(prompt, list) and all(type(i) is int for i in prompt):
        return prompt  # as it is: a long prompt is not copied
    return [operator.index(i) for i in prompt]


@torch.inference_mode()
def sample_stream(
    model: GPT,
    prompt: list[int],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield `cfg.max_new_tokens` new token ids one at a time (temperature, top-k, top-p, repetition penalty)."""
    cfg.validate(model.cfg.seq_len)
    prompt = _check_prompt(model, prompt)
    device = model.tok_emb.weight.device
    shift = cfg.shift_for(model.cfg.seq_len)
    window = ContextWindow(model, 1, shift, use_cache, len(prompt) + cfg.max_new_tokens)
    penalize = cfg.repetition_penalty != 1.0
    seen = _seen_mask(prompt, 1, model.vocab_size, device) if penalize else None
    with eval_mode(model):
        kept = prompt[-model.cfg.seq_len :]  # what the window reads
        logits = window.prefill(torch.tensor([kept], dtype=torch.long, device=device))
    for i in range(cfg.max_new_tokens):
        next_id = pick_next(logits, cfg, generator, seen)  # (1,)
        yield int(next_id)
        if penalize:
            seen[0, next_id] = True
        if i + 1 < cfg.max_new_tokens:
            with eval_mode(model):
                logits = window.append(next_id)


class BeamTree:
    """Every step's beams as back-pointers: the beam of the step before that each grew from, and the token it added,
    so a step costs O(beams) however long the output.

    It also finds the tokens that every current beam holds: those up to the beams' last common ancestor, which only
    moves on as the search goes. For each current beam it follows its ancestor among the beams of the first step not
    settled (the probe), at O(beams) a step. Once all have the same one, a walk back from the current beams finds
    their last common ancestor, and the probe moves to the step after it. Beams that never share an ancestor again
    (they may differ only in tokens that have left the context) then cost nothing more, and their tokens come at the
    end.
    """

    def __init__(self, n_beams: int):
        self.n_beams = n_beams
        self.parents = np.zeros((64, n_beams), dtype=np.int64)  # row s - base: step s's beams' rows in step s - 1
        self.tokens = np.zeros((64, n_beams), dtype=np.int64)  # row s - base: the token step s's beams added
        self.base = 0  # the step of row 0: the steps before it are settled and forgotten
        self.steps = 0
        self.settled = 0  # the steps whose tokens every beam holds
        self.settled_tokens: list[int] = []  # those tokens
        self.probe: np.ndarray | None = None  # each current beam's ancestor among the beams of step `settled`

    def add(self, rows: np.ndarray, ids: np.ndarray) -> list[int]:
        """Record a step: beam j grew from beam `rows[j]` of the step before and added `ids[j]`. Returns the tokens
        that every beam holds from this step on (after those returned before)."""
        if self.steps - self.base == len(self.parents):
            self._make_room()
        self.parents[self.steps - self.base], self.tokens[self.steps - self.base] = rows, ids
        self.steps += 1
        # The first step not settled is this one (its beams are their own ancestors there), or an earlier one.
        self.probe = np.arange(self.n_beams) if self.probe is None else self.probe[rows]
        if (self.probe != self.probe[0]).any():
            return []
        step, beams = self.steps - 1, np.arange(self.n_beams)
        after = beams  # the current beams' ancestors at step + 1
        while (beams != beams[0]).any():  # back to the last common ancestor, at step `settled` at the earliest
            after, beams = beams, self.parents[step - self.base, beams]
            step -= 1
        new = self.path(int(beams[0]), step)
        self.settled_tokens += new
        self.settled = step + 1
        self.probe = after if self.settled < self.steps else None
        return new

    def best(self) -> list[int]:
        """The new tokens of the best beam of the last step."""
        return self.settled_tokens + self.path(0)

    def path(self, beam: int, step: int | None = None) -> list[int]:
        """The tokens not settled yet of beam `beam` of step `step` (by default the last)."""
        step = self.steps - 1 if step is None else step
        out = []
        while step >= self.settled:
            out.append(int(self.tokens[step - self.base, beam]))
            beam = int(self.parents[step - self.base, beam])
            step -= 1
        return out[::-1]

    def _make_room(self) -> None:
        """Drop the settled steps' rows where they are half the buffer or more, else double it."""
        if self.settled - self.base >= len(self.parents) // 2:
            kept = slice(self.settled - self.base, self.steps - self.base)
            n = kept.stop - kept.start
            self.parents[:n], self.tokens[:n] = self.parents[kept].copy(), self.tokens[kept].copy()
            self.base = self.settled
        else:
            self.parents = np.concatenate([self.parents, np.zeros_like(self.parents)])
            self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])


@dataclass
class BeamState:
    """The beams after a step of beam search, best first: each one's new tokens are `tree.settled_tokens` followed by
    `tree.path(beam)`."""

    settled: list[int]  # the tokens every beam came to hold at this step, after those settled before: every later
    # beam grows from these beams, so the final best beam holds them too
    scores: torch.Tensor  # (beams,) total log-probabilities
    tree: BeamTree


@torch.inference_mode()
def _beam_steps(model: GPT, prompt: list[int], cfg: SamplingConfig, use_cache: bool) -> Iterator[BeamState]:
    """The beams after each of `cfg.max_new_tokens` steps."""
    cfg.validate(model.cfg.seq_len)
    prompt = _check_prompt(model, prompt)
    with eval_mode(model):
        device = model.tok_emb.weight.device
        n_beams, vocab = cfg.beams, model.vocab_size
        shift = cfg.shift_for(model.cfg.seq_len)
        window = ContextWindow(model, n_beams, shift, use_cache, len(prompt) + cfg.max_new_tokens)
        penalize = cfg.repetition_penalty != 1.0
        seen = _seen_mask(prompt, n_beams, vocab, device) if penalize else None
        kept = torch.tensor(prompt[-model.cfg.seq_len :], dtype=torch.long, device=device)  # what the window reads
        logits = window.prefill(kept.expand(n_beams, -1))
        scores = torch.full((n_beams,), float("-inf"), device=device)
        scores[0] = 0.0  # all beams start as the same prompt: expand only the first
        tree = BeamTree(n_beams)
        for i in range(cfg.max_new_tokens):
            if penalize:
                logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
            candidates = scores[:, None] + F.log_softmax(logits, dim=-1)  # (beams, vocab)
            scores, flat = torch.topk(candidates.view(-1), n_beams)  # sorted: the best beam first
            rows, next_ids = flat // vocab, flat % vocab
            settled = tree.add(rows.cpu().numpy(), next_ids.cpu().numpy())
            if penalize:
                seen = seen[rows]
                seen[torch.arange(n_beams, device=device), next_ids] = True
            yield BeamState(settled, scores, tree)
            if i + 1 < cfg.max_new_tokens:
                window.reorder(rows)
                logits = window.append(next_ids)


def beam_search(model: GPT, prompt: list[int], cfg: SamplingConfig, use_cache: bool = True) -> tuple[list[int], float]:
    """The highest-scoring continuation of `cfg.max_new_tokens` tokens among `cfg.beams` beams, and its score.

    Beams are ranked by total log-probability. Every beam runs to `max_new_tokens` (there is no end-of-text token),
    so all finished beams have the same length and need no length normalisation. The repetition penalty applies to
    each beam's own text; temperature, top-k and top-p do not apply.
    """
    stream = BeamStream(model, prompt, cfg, use_cache)
    for _ in stream:
        pass
    return stream.best, stream.score


class BeamStream:
    """`beam_search`'s continuation, iterated: the ids of the best beam, each as soon as every beam grows from it.
    `best` is the best beam so far (the whole continuation once the iteration has ended) and `score` its total
    log-probability.

    Each step's beams grow from the beams before it, so the tokens of the beams' last common ancestor are in the final
    best beam too: they can be shown while the search goes on. The rest comes when the search ends.
    """

    def __init__(self, model: GPT, prompt: list[int], cfg: SamplingConfig, use_cache: bool = True):
        self._steps = _beam_steps(model, prompt, cfg, use_cache)
        self._last: BeamState | None = None  # the beams after the last step so far

    @property
    def best(self) -> list[int]:
        return self._last.tree.best() if self._last is not None else []

    @property
    def score(self) -> float:
        return float(self._last.scores[0]) if self._last is not None else 0.0

    def __iter__(self) -> Iterator[int]:
        for state in self._steps:
            self._last = state
            yield from state.settled
        if self._last is not None:
            yield from self._last.tree.path(0)


def generate(
    model: GPT,
    prompt: list[int],
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The new token ids: beam search when `cfg.beams > 1`, else sampling (greedy at temperature 0). `prompt` is a
    list of token ids (a 1-D tensor of them will do)."""
    if not isinstance(cfg, SamplingConfig):
        raise FluxtrainError(f"the sampling settings must be a SamplingConfig, not {type(cfg).__name__}")
    cfg.validate(model.cfg.seq_len)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise FluxtrainError(f"generator must be a torch.Generator (or None), not {type(generator).__name__}")
    if cfg.beams > 1:
        return beam_search(model, prompt, cfg, use_cache)[0]
    with eval_mode(model):  # once for the whole stream, so its per-token entries find eval mode and do nothing
        return list(sample_stream(model, prompt, cfg, generator, use_cache))


@torch.inference_mode()
def sequence_logprob(model: GPT, prompt: list[int], new_ids: list[int], shift: int) -> float:
    """Total log-probability of `new_ids` after `prompt`, seen through the same sliding window as decoding."""
    device = model.tok_emb.weight.device
    window = ContextWindow(model, 1, shift, positions=len(prompt) + len(new_ids))
    total = 0.0
    with eval_mode(model):
        logits = window.prefill(torch.tensor([prompt], dtype=torch.long, device=device))
        for i, token in enumerate(new_ids):
            total += float(F.log_softmax(logits[0], dim=-1)[token])
            if i + 1 < len(new_ids):
                logits = window.append(torch.tensor([token], device=device))
    return total


def generate_ids(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Continue `prompt` by `max_new_tokens` sampled ids (the trainer's periodic samples)."""
    if max_new_tokens <= 0:
        return []
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0)
    return generate(model, prompt, cfg, generator, use_cache)


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt starts from: a newline, as the trainer's samples do, or id 0 where the tokenizer has no
    newline (a char vocabulary of text without one)."""
    try:
        ids = tokenizer.encode("\n")
    except UnknownCharactersError:
        ids = []
    return ids or [0]
