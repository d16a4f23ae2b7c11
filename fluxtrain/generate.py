"""Sampling from a trained model."""

from __future__ import annotations

import torch

from fluxtrain.model import GPT


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue `prompt` by `max_new_tokens` ids, with a KV cache; the context slides when it is full."""
    device = model.tok_emb.weight.device
    seq_len = model.cfg.seq_len
    ids = list(prompt)
    cache = None
    for _ in range(max_new_tokens):
        if cache is None or cache.length >= seq_len:
            cache = model.new_cache(1)
            x = torch.tensor([ids[-seq_len:]], device=device)
        else:
            x = torch.tensor([ids[-1:]], device=device)
        logits, _ = model(x, cache=cache)
        logits = logits[0, -1].float()
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_id = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        ids.append(next_id)
    return ids[len(prompt) :]
