"""Next-token choice: pure functions of logits, parameters and a seeded generator."""

from __future__ import annotations

import torch

from engine.config import SamplingParams


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
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (K, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= params.top_p  # keeps the token that crosses top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).flatten().tolist()
