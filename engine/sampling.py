"""Next-token choice: pure functions of logits, parameters and a seeded generator, run where the logits are.

Sampling on the model's device keeps the logits (rows x vocabulary floats) off the host, and on a GPU it queues
behind the forward without waiting for it: the engine samples every session of a step, then reads all the chosen
tokens with one transfer. The same seed and logits give the same tokens on the same device.
"""

from __future__ import annotations

import torch

from engine.config import SamplingParams

NUCLEUS_CANDIDATES = 1024  # tokens ranked first, on a CPU, when looking for the top_p nucleus


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, candidates_first: bool | None = None
) -> torch.Tensor:
    """logits (K, V) -> (K,) token ids on the logits' device. temperature 0 is greedy; top_k then top_p filter.

    candidates_first: look for the top_p nucleus among the NUCLEUS_CANDIDATES likeliest tokens before ranking
    the whole vocabulary (None: on a CPU only, where a sort of the vocabulary costs milliseconds; on a GPU the
    sort is cheap and checking the candidates would make the host wait for the device). The same tokens either
    way (see `draw`).
    """
    logits = logits.detach().float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then gives -inf for the rest (greedy,
    # ties drawn among), never an overflow to inf and NaN probabilities.
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (K, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p >= 1.0:
        return draw(logits.softmax(dim=-1), generator)
    if candidates_first is None:
        candidates_first = logits.device.type == "cpu"
    total = logits.logsumexp(dim=-1, keepdim=True)  # (K, 1)
    widths = (min(NUCLEUS_CANDIDATES, vocab), vocab) if candidates_first else (vocab,)
    for width in widths:
        top, order = logits.topk(width, dim=-1)  # (K, width), likeliest first
        probs = (top - total).exp()
        if width == vocab or bool((probs.sum(dim=-1) >= params.top_p).all()):
            break
    before = probs.cumsum(dim=-1) - probs  # mass of the likelier tokens
    probs = probs.masked_fill(before >= params.top_p, 0.0)  # keeps the token that crosses top_p
    return order.gather(1, draw(probs, generator)[:, None]).flatten()


def draw(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(K, W) non-negative weights -> (K,) column indices, each row drawn in proportion to its weights.

    By inverse CDF with one uniform number per row: the draw depends on the weights up to the chosen column
    only, so trailing zero weights (a nucleus ranked within the candidates or within the whole vocabulary) never
    change which token one seed picks.
    """
    cdf = weights.cumsum(dim=-1)  # (K, W)
    uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype)
    target = (1.0 - uniform) * cdf[:, -1:]  # in (0, total]: a zero weight is never chosen
    return torch.searchsorted(cdf, target).clamp_(max=cdf.shape[-1] - 1).flatten()
