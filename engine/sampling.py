"""Next-token choice: pure functions of logits, parameters and a seeded generator."""

from __future__ import annotations

import torch

from engine.config import SamplingParams

NUCLEUS_CANDIDATES = 1024  # tokens ranked first when looking for the top_p nucleus


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> list[int]:
    """logits (K, V) -> K token ids. temperature 0 is greedy; top_k then top_p filter before sampling.

    Sampling runs on the CPU in float32 so the same seed gives the same tokens on any device.
    """
    logits = logits.detach().to("cpu", torch.float32)
    if params.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (K, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p >= 1.0:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).flatten().tolist()
    # The nucleus nearly always lies within the likeliest few hundred tokens: rank those alone, and the whole
    # vocabulary only when some row's candidates do not reach top_p (a sort of the vocabulary costs milliseconds).
    total = logits.logsumexp(dim=-1, keepdim=True)  # (K, 1)
    for width in (min(NUCLEUS_CANDIDATES, vocab), vocab):
        top, order = logits.topk(width, dim=-1)  # (K, width), likeliest first
        probs = (top - total).exp()
        if width == vocab or bool((probs.sum(dim=-1) >= params.top_p).all()):
            break
    before = probs.cumsum(dim=-1) - probs  # mass of the likelier tokens
    probs = probs.masked_fill(before >= params.top_p, 0.0)  # keeps the token that crosses top_p
    choice = torch.multinomial(probs, 1, generator=generator)  # (K, 1) index into `order`
    return order.gather(1, choice).flatten().tolist()
