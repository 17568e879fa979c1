"""Prompt prefix caching: page keys, restore and eviction, and sessions that reuse what others computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.cache import SessionCache
from engine.config import EngineConfig, SamplingParams, SessionRequest
from engine.engine import Engine
from engine.errors import ConfigurationError
from engine.events import DoneEvent, TokenEvent
from engine.prefix_cache import PAGE_TOKENS, PrefixCache
from engine.session import PREFILL_CHUNK

GREEDY = SamplingParams(temperature=0.0)
LAYERS, HEADS, DIM = 2, 2, 8


def filled_cache(tokens: int, seed: int) -> SessionCache:
    cache = SessionCache(LAYERS, HEADS, DIM, 3, torch.float32, torch.device("cpu"), common_capacity=tokens)
    generator = torch.Generator().manual_seed(seed)
    cache.common_k.copy_(torch.randn(cache.common_k.shape, generator=generator))
    cache.common_v.copy_(torch.randn(cache.common_v.shape, generator=generator))
    return cache


def test_a_page_key_names_the_whole_prefix_up_to_its_end() -> None:
    prefix = PrefixCache(1024)
    page = list(range(PAGE_TOKENS))
    a = prefix.page_keys(page + page + [1, 2, 3])
    b = prefix.page_keys([7] * PAGE_TOKENS + page)
    assert len(a) == 2 and len(b) == 2  # full pages only
    assert a[0] != a[1]  # the same tokens after another parent
    assert a[1] != b[1]
    assert prefix.page_keys(page + page) == a
    assert PrefixCache(0).page_keys(page * 4) == []  # off


def test_restore_copies_the_stored_pages_exactly() -> None:
    prefix = PrefixCache(1024)
    source = filled_cache(3 * PAGE_TOKENS, seed=0)
    keys = prefix.page_keys(list(range(3 * PAGE_TOKENS)))
    prefix.store(keys, source)
    assert prefix.num_tokens == 3 * PAGE_TOKENS
    assert prefix.nbytes == 2 * source.common_k[:, :, : 3 * PAGE_TOKENS].nbytes

    other = list(range(2 * PAGE_TOKENS)) + [999] * PAGE_TOKENS  # shares two pages
    other_keys = prefix.page_keys(other)
    assert prefix.cached_pages(other_keys) == 2
    target = filled_cache(3 * PAGE_TOKENS, seed=1)
    assert prefix.restore(other_keys[:2], target) == 2 * PAGE_TOKENS
    span = slice(0, 2 * PAGE_TOKENS)
    assert torch.equal(target.common_k[:, :, span], source.common_k[:, :, span])
    assert torch.equal(target.common_v[:, :, span], source.common_v[:, :, span])
    assert target.lengths[0] == 2 * PAGE_TOKENS
    source.common_k.zero_()  # stored pages are copies, not views of a session's cache
    assert prefix.cached_pages(keys) == 3 and prefix.restore(keys, target) == 3 * PAGE_TOKENS
    assert torch.equal(target.common_k[:, :, span], filled_cache(3 * PAGE_TOKENS, seed=0).common_k[:, :, span])


def test_eviction_trims_the_least_recently_used_prefixes_from_their_ends() -> None:
    prefix = PrefixCache(4 * PAGE_TOKENS)
    first = prefix.page_keys(list(range(3 * PAGE_TOKENS)))
    prefix.store(first, filled_cache(3 * PAGE_TOKENS, seed=0))
    second = prefix.page_keys([5] * (3 * PAGE_TOKENS))
    prefix.store(second, filled_cache(3 * PAGE_TOKENS, seed=1))
    assert prefix.num_tokens == 4 * PAGE_TOKENS
    assert prefix.cached_pages(second) == 3
    assert prefix.cached_pages(first) == 1  # its last pages went first, its first page is still usable
    long = prefix.page_keys([6] * (9 * PAGE_TOKENS))
    prefix.store(long, filled_cache(9 * PAGE_TOKENS, seed=2))  # more than fits: its leading pages are kept
    assert prefix.cached_pages(long) == 4 and prefix.num_tokens == 4 * PAGE_TOKENS


# ---- in the engine ------------------------------------------------------------------------------------------


def engine_for(path: Path, **config: object) -> Engine:
    return Engine.load(EngineConfig(model=str(path), device="cpu", dtype="float32", **config))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def request(task: str, **overrides: object) -> SessionRequest:
    values: dict = {"prompt": task, "num_workers": 2, "max_tokens": 12, "sampling": GREEDY, "final_answer": False}
    values.update(overrides)
    return SessionRequest(**values)


def run_alone(engine: Engine, req: SessionRequest) -> tuple[dict[int, list[int]], DoneEvent]:
    tokens: dict[int, list[int]] = {}
    events = list(engine.generate(req))
    for event in events:
        if isinstance(event, TokenEvent):
            tokens.setdefault(event.worker, []).extend(event.token_ids)
    assert isinstance(events[-1], DoneEvent)
    return tokens, events[-1]


def test_a_session_reusing_a_prefix_samples_what_one_computing_it_samples(tiny_path: Path) -> None:
    cold = engine_for(tiny_path, prefix_cache_tokens=0)
    warm = engine_for(tiny_path)
    expected, done = run_alone(cold, request("Add 2 and 3."))
    assert done.usage.cached_prompt_tokens == 0

    run_alone(warm, request("Multiply 4 by 5."))  # computes and stores the shared rules
    tokens, done = run_alone(warm, request("Add 2 and 3."))
    prompt_len = len(warm._prompt_ids(request("Add 2 and 3.")))
    assert 0 < done.usage.cached_prompt_tokens <= prompt_len - 1
    assert done.usage.cached_prompt_tokens % PAGE_TOKENS == 0
    assert done.usage.to_dict()["prompt_tokens_details"] == {"cached_tokens": done.usage.cached_prompt_tokens}
    assert tokens == expected

    again, done = run_alone(warm, request("Add 2 and 3."))  # the whole prompt but its last token is held now
    assert done.usage.cached_prompt_tokens == (prompt_len - 1) // PAGE_TOKENS * PAGE_TOKENS
    assert again == expected


def test_restored_keys_and_values_match_computed_ones(tiny_path: Path) -> None:
    engine = engine_for(tiny_path)
    run_alone(engine, request("Multiply 4 by 5."))
    engine.add_session("warm", request("Add 2 and 3."))
    engine.step()
    cold = engine_for(tiny_path, prefix_cache_tokens=0)
    cold.add_session("cold", request("Add 2 and 3."))
    cold.step()
    warm_cache, cold_cache = engine._sessions["warm"].cache, cold._sessions["cold"].cache
    assert engine._sessions["warm"].cached_prompt_tokens > 0
    length = cold_cache.lengths[0]
    assert warm_cache.lengths[0] == length
    torch.testing.assert_close(warm_cache.common_k[:, :, :length], cold_cache.common_k[:, :, :length])
    torch.testing.assert_close(warm_cache.common_v[:, :, :length], cold_cache.common_v[:, :, :length])


def test_a_burst_with_the_same_rules_computes_them_once(tiny_path: Path) -> None:
    engine = engine_for(tiny_path)
    tasks = ["Add 2 and 3.", "Multiply 4 by 5.", "Subtract 1 from 9."]
    for index, task in enumerate(tasks):
        engine.add_session(f"s{index}", request(task))
    first = engine.step()  # s0 computes the rules; s1 and s2 wait for them instead of computing them too
    assert {sid for sid, _ in first} == {"s0"}
    assert engine._sessions["s1"].is_prefilling and not engine._sessions["s1"].has_started
    done: dict[str, DoneEvent] = {}
    for _ in range(100):
        done.update((sid, e) for sid, e in engine.step() if isinstance(e, DoneEvent))
        if not engine.num_running:
            break
    first_done = [e for sid, e in first if isinstance(e, DoneEvent)]
    assert not first_done and set(done) == {"s0", "s1", "s2"}
    assert engine._sessions == {} and engine._prompt_pages == {}
    assert done["s1"].usage.cached_prompt_tokens > 0 and done["s2"].usage.cached_prompt_tokens > 0


def test_pages_are_stored_as_each_prefill_chunk_completes(tiny_path: Path) -> None:
    engine = engine_for(tiny_path)
    notes = "Mind the carry. " * 120  # prompts longer than one prefill chunk, the same up to their last words
    engine.add_session("a", request("Add 2 and 3. " + notes + "Then double it."))
    engine.add_session("b", request("Add 2 and 3. " + notes + "Then halve it."))
    engine.step()  # a computes its first chunk; b waits for the pages in it
    assert engine._sessions["a"].is_prefilling and not engine._sessions["b"].has_started
    assert engine.prefix_cache.num_tokens == PREFILL_CHUNK  # a's first chunk is usable before its prefill ends
    engine.cancel("a")
    events = [e for _ in range(40) for sid, e in engine.step() if sid == "b"]
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].usage.cached_prompt_tokens == PREFILL_CHUNK  # what a stored, not what it never computed


def test_a_failed_prefill_stores_nothing(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_for(tiny_path)

    def broken(active: list) -> None:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "_advance", broken)
    engine.add_session("a", request("Add 2 and 3."))
    [(sid, event)] = engine.step()
    assert sid == "a" and "device lost" in event.message
    assert engine.prefix_cache.num_tokens == 0 and engine._prompt_pages == {} and engine.num_running == 0


def test_the_warm_up_session_leaves_the_default_rules_in_the_cache(tiny_path: Path) -> None:
    engine = engine_for(tiny_path)
    engine.warm_up()
    assert engine.num_running == 0 and engine.prefix_cache.num_tokens > 0
    _, done = run_alone(engine, request("Add 2 and 3."))  # two workers, the default team
    assert done.usage.cached_prompt_tokens > 0


def test_a_warm_up_that_cannot_fit_the_cache_budget_blames_the_budget(tiny_path: Path) -> None:
    engine = engine_for(tiny_path, cache_budget_tokens=100)
    with pytest.raises(ConfigurationError, match=r"budget of 100 tokens .* reserves \d+; raise it, or set 0"):
        engine.warm_up()
    assert engine.num_running == 0


def test_a_warm_up_that_cannot_fit_the_models_context_blames_the_model_not_a_prompt(tiny_model_factory) -> None:
    engine = engine_for(tiny_model_factory("llama", max_position_embeddings=200))
    with pytest.raises(ConfigurationError, match=r"the context of .* \(200 tokens\) cannot hold even a short"):
        engine.warm_up()


def test_a_prefix_cache_out_of_memory_empties_it_and_the_session_goes_on(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_for(tiny_path)
    run_alone(engine, request("Multiply 4 by 5."))
    assert engine.prefix_cache.num_tokens > 0

    def no_memory(keys: list[bytes], cache: SessionCache) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine.prefix_cache, "store", no_memory)
    tokens, done = run_alone(engine, request("Add 2 and 3."))
    assert tokens and done.finish_reasons == ("length", "length")
    assert engine.prefix_cache.num_tokens == 0 and "could not store" in caplog.text
