"""Next-token sampling: greedy, top_k, top_p (with and without the candidate shortcut), seeds."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from engine.config import SamplingParams
from engine.sampling import NUCLEUS_CANDIDATES, draw, make_generator, sample


def draws(
    logits: torch.Tensor, params: SamplingParams, count: int, seed: int = 0, candidates_first: bool | None = None
) -> Counter[int]:
    generator = make_generator(seed)
    return Counter(
        token for _ in range(count) for token in sample(logits, params, generator, candidates_first).tolist()
    )


def test_temperature_zero_and_top_k_one_are_greedy() -> None:
    logits = torch.randn(3, 100)
    expected = logits.argmax(dim=-1).tolist()
    assert sample(logits, SamplingParams(temperature=0.0), make_generator(0)).tolist() == expected
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), make_generator(0)).tolist() == expected


@pytest.mark.parametrize("candidates_first", [True, False])
def test_top_p_keeps_the_token_that_crosses_it_and_nothing_after(candidates_first: bool) -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # ranked: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    counts = draws(probs.log(), SamplingParams(temperature=1.0, top_p=0.7), 2000, candidates_first=candidates_first)
    assert set(counts) == {1, 3}  # 0.5 < 0.7, so token 3 crosses it and stays; token 2 starts at 0.8
    assert 0.56 < counts[1] / 2000 < 0.69  # renormalised: 0.5 / 0.8 = 0.625


@pytest.mark.parametrize("candidates_first", [True, False])
def test_top_k_filters_before_top_p(candidates_first: bool) -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.55)
    counts = draws(probs.log(), params, 500, candidates_first=candidates_first)
    assert set(counts) == {0}  # top_k leaves 0.4 / 0.7 = 0.57 >= 0.55; top_p first would keep 0.4 < 0.55 and 0.3


@pytest.mark.parametrize("candidates_first", [True, False])
def test_a_nucleus_wider_than_the_candidates_is_found_in_the_whole_vocabulary(candidates_first: bool) -> None:
    vocab = 8 * NUCLEUS_CANDIDATES
    logits = -torch.arange(vocab, dtype=torch.float32)[None] * 1e-5  # nearly flat, ranked by id
    probs = logits.softmax(dim=-1)[0]
    nucleus = int((probs.cumsum(dim=0) - probs < 0.9).sum())  # about 0.9 * vocab tokens
    counts = draws(logits, SamplingParams(temperature=1.0, top_p=0.9), 400, candidates_first=candidates_first)
    assert max(counts) < nucleus
    assert max(counts) >= NUCLEUS_CANDIDATES  # reached beyond the candidates
    assert nucleus > 0.85 * vocab


def test_rows_are_sampled_independently_and_seeds_repeat() -> None:
    logits = torch.full((2, 50), -30.0)
    logits[0, 7] = logits[1, 42] = 0.0  # each row is nearly certain of a different token
    params = SamplingParams(temperature=1.0, top_p=0.9)
    assert sample(logits, params, make_generator(3)).tolist() == [7, 42]
    wide = torch.randn(4, 3000)
    assert torch.equal(sample(wide, params, make_generator(5)), sample(wide, params, make_generator(5)))


def test_both_nucleus_searches_pick_the_same_tokens() -> None:
    """Ranking the candidates first or the whole vocabulary at once finds the same nucleus in the same order, so
    one seed draws the same tokens either way."""
    logits = torch.randn(6, 5000) * 4
    params = SamplingParams(temperature=0.7, top_p=0.9)
    first = sample(logits, params, make_generator(11), candidates_first=True)
    whole = sample(logits, params, make_generator(11), candidates_first=False)
    assert torch.equal(first, whole)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_tokens_stay_on_the_logits_device(device: str) -> None:
    logits = torch.randn(2, 100, dtype=torch.bfloat16, device=device)
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_p=1.0), SamplingParams()):
        tokens = sample(logits, params, make_generator(0, logits.device))
        assert tokens.shape == (2,) and tokens.dtype == torch.long and tokens.device == logits.device


def test_draw_follows_the_weights_and_ignores_trailing_zeros() -> None:
    weights = torch.tensor([[0.0, 1.0, 0.0, 3.0, 0.0]]).expand(4000, -1)
    picks = Counter(draw(weights, make_generator(2)).tolist())
    assert set(picks) == {1, 3}  # a zero weight is never drawn
    assert 0.22 < picks[1] / 4000 < 0.28  # 1 / (1 + 3)
    padded = torch.cat([weights, torch.zeros(4000, 1000)], dim=1)
    assert torch.equal(draw(weights, make_generator(9)), draw(padded, make_generator(9)))


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 1e-45])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_a_tiny_temperature_is_greedy_not_noise(temperature: float, top_p: float) -> None:
    """Logits divided by a temperature near float32's smallest would overflow to inf (NaN probabilities, any
    token drawn); the likeliest token must win every time instead."""
    logits = torch.randn(4, 1000) * 10
    expected = logits.argmax(dim=-1)
    for seed in range(5):
        picked = sample(logits, SamplingParams(temperature=temperature, top_p=top_p), make_generator(seed))
        assert torch.equal(picked, expected)
