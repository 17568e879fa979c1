"""Session rules driven by scripted samples: no model forward, the real tokenizer, a small real cache."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from engine import prompts
from engine.cache import SessionCache
from engine.config import SessionRequest
from engine.events import AnswerEvent, DoneEvent, InsertedEvent, StepEndEvent, TokenEvent
from engine.plan import build_forward
from engine.session import FIRST_STEP_BLOCK, Session

INV_FREQ = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))


@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path):
    return AutoTokenizer.from_pretrained(default_model_dir)


def make_session(tokenizer, context_length: int = 8192, **request: object) -> Session:
    model = SimpleNamespace(
        tokenizer=tokenizer, eos_token_ids=frozenset({tokenizer.eos_token_id}), context_length=context_length,
        inv_freq=INV_FREQ, inserted_text=prompts.InsertedText(tokenizer),
    )
    req = SessionRequest(**{"prompt": "Add 2 and 2.", "redundancy_check_every": 0, **request})  # type: ignore[arg-type]
    cache = SessionCache(1, 1, 8, req.num_workers + 2, torch.float32, torch.device("cpu"))
    return Session("s", req, tokenizer.encode("<prompt>"), model, cache)  # type: ignore[arg-type]


def token(tokenizer, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return ids[0]


def drive(session: Session, tokenizer, script: list[list[str]]) -> list:
    """Each script row gives one token text per worker fed in that forward."""
    events = []
    for row in script:
        runs = session.runs()
        assert len(runs) >= len(row)
        build_forward([(session.cache, runs)], INV_FREQ, torch.float32)  # what a forward writes
        session.commit([token(tokenizer, text) for text in row])
        events += session.take_events()
        if session.done:
            break
    return events


def test_history_holds_finished_steps_in_the_order_they_finish(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=50)
    prompt_len = len(session.common)
    events = drive(session, tokenizer, [
        [" think", " Ok"], [" more", "."], [" about", "\n"], [" it", "\n"],  # Bob finishes step 1 first
        [".", " Next"], ["\n", "."], ["\n", "\n"], [" go", "\n"], [" on", " x"],  # Alice, then Bob step 2
    ])
    ends = [(e.worker, e.step) for e in events if isinstance(e, StepEndEvent)]
    assert ends == [(1, 1), (0, 1), (1, 2)]
    assert session.history == [(1, 1), (0, 1), (1, 2)]
    history_text = tokenizer.decode(session.common.ids[prompt_len:])
    headers = [history_text.index(header) for header in ("**Bob [1]:**", "**Alice [1]:**", "**Bob [2]:**")]
    assert headers == sorted(headers)
    assert session.cache.lengths[0] == len(session.common)
    assert session.cache.lengths[FIRST_STEP_BLOCK + 1] == len(session.workers[1].block)


def test_every_worker_sees_what_the_others_feed_in_the_same_forward(tokenizer) -> None:
    """Visibility does not depend on a worker's index: in every forward, each worker's view holds every other
    worker's block with the tokens fed in that forward, also while one feeds a new step's header."""
    session = make_session(tokenizer, num_workers=3, max_tokens=50)
    script = [[" a", " b", " c"], [".", " d", " e"], ["\n\n", " f", " g"], [" h", " i", " j"], [" k", " l", " m"]]
    checked = 0
    for row in [[]] + script:  # the first forward is the prompt's, with every worker's first step
        if row:
            session.commit([token(tokenizer, text) for text in row])
        runs = session.runs()
        build_forward([(session.cache, runs)], INV_FREQ, torch.float32)  # what a forward writes
        steps = [run for run in runs if run.block >= FIRST_STEP_BLOCK]
        ends = {run.block: run.start + len(run.token_ids) for run in steps}  # block lengths after this forward
        for run in steps:
            seen = {block: length for block, length in run.view if block >= FIRST_STEP_BLOCK}
            assert seen == {block: end for block, end in ends.items() if block != run.block}
            checked += 1
    assert [e.worker for e in session.take_events() if isinstance(e, StepEndEvent)] == [0]
    assert checked == 3 * (len(script) + 1)


def test_a_session_out_of_context_announces_no_step_it_does_not_write(tokenizer) -> None:
    """Ending with "length" because the views reach the context happens before the next steps open: every
    header the session reported is in the final views, at every context length around the first step end."""
    probe = make_session(tokenizer, num_workers=2, max_tokens=500)
    probe.runs()
    first_views = len(probe.view(0).token_ids)
    endings = set()
    for context in range(first_views, first_views + 16):
        session = make_session(tokenizer, context, num_workers=2, max_tokens=500, final_answer=False,
                               return_views=True, redundancy_check_every=3)
        events, samples = [], [" a", ".", "\n\n"]
        while not session.done:
            runs = session.runs()
            if runs:
                build_forward([(session.cache, runs)], INV_FREQ, torch.float32)
                session.commit([token(tokenizer, samples[session.workers[0].generated % 3])] * 2)
            events += session.take_events()
        done = events[-1]
        assert isinstance(done, DoneEvent) and done.finish_reasons == ("length", "length")
        for worker, view in enumerate(done.views):
            inserted = [e for e in events if isinstance(e, InsertedEvent) and e.worker == worker]
            text = tokenizer.decode(view.token_ids)
            assert all(e.text.strip() in text for e in inserted), f"context {context}: an unwritten insert"
            assert done.usage.steps_per_worker[worker] == max(e.step for e in inserted)
        endings.add(sum(isinstance(e, StepEndEvent) for e in events))
    assert len(endings) > 1  # the sweep ends sessions both before and after steps ended


def test_step_text_is_reported_whole(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=1, max_tokens=20)
    events = drive(session, tokenizer, [[" work"], ["."], ["\n"], ["\n"]])
    (end,) = [e for e in events if isinstance(e, StepEndEvent)]
    assert end.text == "**Alice [1]:** Hi, I'm Alice. Here's how we can work."


def test_redundancy_check_goes_into_the_next_step_header_every_k_tokens(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=60, redundancy_check_every=6)
    row = [["Done", "Done"], [".", "."], ["\n", "\n"], ["\n", "\n"]]
    events = drive(session, tokenizer, row * 4)
    checks = [e for e in events if isinstance(e, InsertedEvent) and e.reason == "intervention"]
    assert all(e.text == prompts.REDUNDANCY_CHECK for e in checks)
    # Both workers start steps 2, 3, 4 after 8, 16, 24 sampled tokens; checks fall due after 6, 12, 18 and 24
    # (still pending: one at most per step start) and 30 (no step starts after it); worker 0 starts first.
    assert [(e.worker, e.step) for e in checks] == [(0, 2), (0, 3), (0, 4)]
    for check in checks:
        index = events.index(check)
        header = events[index - 1]
        assert isinstance(header, InsertedEvent) and header.reason == "header" and header.worker == check.worker


def test_inserted_texts_never_end_in_a_lone_space_token(tokenizer) -> None:
    """A word's leading space belongs to the word's token: a header ending in its own space token left models
    writing digits after it. The header ends at its colon-stars; the check opens with its space-led word."""
    session = make_session(tokenizer, num_workers=1, max_tokens=60, redundancy_check_every=2)
    events = drive(session, tokenizer, [["Done"], ["."], ["\n"], ["\n"], [" Next"]])
    inserted = [e for e in events if isinstance(e, InsertedEvent)]
    first, header, check = inserted[0], inserted[1], inserted[2]
    assert (header.text, header.reason, check.reason) == ("**Alice [2]:**", "header", "intervention")
    for event in inserted:
        assert not tokenizer.decode(event.token_ids[-1:]).isspace(), event
    assert tokenizer.decode(check.token_ids[:1]) == " Quick" and check.text.startswith(" Quick check")
    pieces = tokenizer.convert_ids_to_tokens(first.token_ids)
    assert pieces[pieces.index(":**") + 1] == "ĠHi"  # the seed's first word carries its space


def test_no_redundancy_check_when_disabled(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=60, redundancy_check_every=0)
    events = drive(session, tokenizer, [["Done", "Done"], [".", "."], ["\n", "\n"], ["\n", "\n"]] * 3)
    assert not [e for e in events if isinstance(e, InsertedEvent) and e.reason == "intervention"]


def test_a_boxed_answer_ends_the_session(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=50)
    pieces = [[" so", " x"], [" \\", " y"], ["box", " z"], ["ed", " q"], ["{", " w"], ["7", " v"], ["}", " u"]]
    events = drive(session, tokenizer, pieces)
    answers = [e for e in events if isinstance(e, AnswerEvent)]
    assert [(a.worker, a.text) for a in answers] == [(0, "7")]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer == "7" and done.finish_reasons == ("stop", "stop")


def test_end_of_sequence_ends_the_session(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=50, final_answer=False)
    events = drive(session, tokenizer, [[" a", " b"], [" c", tokenizer.eos_token]])
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reasons == ("stop", "stop") and done.answer is None


@pytest.mark.parametrize("ender", [0, 1])
def test_end_of_sequence_without_an_answer_lets_worker_0_conclude(tokenizer, ender: int) -> None:
    """With final_answer on, a worker that ends its turn before any answer ends the session through the finisher:
    worker 0 alone writes the \\boxed{} conclusion after its own text (an end of turn it sampled is not fed)."""
    session = make_session(tokenizer, num_workers=2, max_tokens=50)
    row = [" c", " d"]
    row[ender] = tokenizer.eos_token
    first = drive(session, tokenizer, [[" a", " b"], row])
    inserted = [e for e in first if isinstance(e, InsertedEvent) and e.reason == "finisher"]
    assert [e.worker for e in inserted] == [0] and session.is_finishing and not session.done
    runs = session.runs()
    assert len(runs) == 1 and runs[0].block == FIRST_STEP_BLOCK, "worker 0 alone feeds"
    assert tokenizer.eos_token_id not in runs[0].token_ids
    assert runs[0].token_ids[-len(inserted[0].token_ids) :] == inserted[0].token_ids
    build_forward([(session.cache, runs)], INV_FREQ, torch.float32)
    session.commit([token(tokenizer, "7")])
    events = first + session.take_events() + drive(session, tokenizer, [["}"]])
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer == "7" and done.finish_reasons == ("stop", "stop")
    # Worker 0 wrote 2 tokens, then 2 of the finisher; an end of turn counts. Worker 1's sample in the round that
    # ended worker 0's turn is dropped (never counted, never shown); in the other order it came first and counts.
    assert done.usage.completion_tokens_per_worker == ((4, 1) if ender == 0 else (4, 2))
    after_finisher = events[events.index(inserted[0]) :]
    assert not [e for e in after_finisher if isinstance(e, TokenEvent) and e.worker == 1]


def test_a_finisher_that_closes_an_empty_box_ends_without_an_answer(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=1, max_tokens=2)
    drive(session, tokenizer, [[" a"], [" b"]])  # the budget runs out: the finisher opens the box
    assert session.is_finishing
    events = drive(session, tokenizer, [["}"], [" more"]])
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer is None and done.finish_reasons == ("length",)
    assert [e.text for e in events if isinstance(e, TokenEvent)] == ["}"], "nothing is sampled after the box"


def test_the_finisher_continues_a_step_that_ended_in_the_last_round(tokenizer) -> None:
    """The budget runs out in the round whose token ended worker 0's step: the finisher's text follows that step
    as it is, with no header of a next step in the way of the answer."""
    session = make_session(tokenizer, num_workers=1, max_tokens=4)
    events = drive(session, tokenizer, [[" work"], ["."], ["\n"], ["\n"]])
    assert [e.step for e in events if isinstance(e, StepEndEvent)] == [1]
    (finisher,) = [e for e in events if isinstance(e, InsertedEvent) and e.reason == "finisher"]
    assert not [e for e in events if isinstance(e, InsertedEvent) and e.reason == "header" and e.step > 1]
    (run,) = session.runs()
    fed = tokenizer.decode(run.token_ids)
    assert fed.endswith(finisher.text) and "[2]" not in fed
    build_forward([(session.cache, [run])], INV_FREQ, torch.float32)
    session.commit([token(tokenizer, "7")])
    done = drive(session, tokenizer, [["}"]])[-1]
    assert isinstance(done, DoneEvent) and done.answer == "7" and done.finish_reasons == ("length",)


def test_budget_without_finisher_ends_with_length(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=3, final_answer=False)
    events = drive(session, tokenizer, [[" a", " b"]] * 5)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reasons == ("length", "length")
    assert done.usage.completion_tokens_per_worker == (3, 3)
    assert not session.is_finishing


def test_finisher_forces_a_final_answer_beyond_the_budget_and_usage_counts_its_tokens(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=3)
    events = drive(session, tokenizer, [[" a", " b"]] * 3)
    assert session.is_finishing and not session.done
    finisher = [e for e in events if isinstance(e, InsertedEvent) and e.reason == "finisher"]
    assert [e.worker for e in finisher] == [0] and finisher[0].text.endswith("\\boxed{")
    assert len(session.runs()) == 1  # only worker 0 continues
    session.commit([token(tokenizer, "4")])
    session.runs()
    session.commit([token(tokenizer, "}")])
    events = session.take_events()
    assert [e.text for e in events if isinstance(e, AnswerEvent)] == ["4"]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer == "4" and done.finish_reasons == ("length", "length")
    assert done.usage.completion_tokens_per_worker == (5, 3)  # worker 0: its 3 budget tokens and "4", "}"


def test_while_the_finisher_writes_the_other_workers_open_no_step(tokenizer) -> None:
    """Bob's last budget token ends his step: no header of a step nobody will write is inserted or counted."""
    session = make_session(tokenizer, num_workers=2, max_tokens=4)
    events = drive(session, tokenizer, [[" a", " Ok"], [" b", "."], [" c", "\n"], [" d", "\n"], ["4"], ["}"]])
    bob_after_budget = [e for e in events if isinstance(e, InsertedEvent) and e.worker == 1 and e.step > 1]
    assert bob_after_budget == []
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.answer == "4"
    assert done.usage.steps_per_worker == (1, 1)


def test_text_is_emitted_only_as_complete_utf8(tokenizer) -> None:
    emoji_ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(emoji_ids) > 1  # the character spans several tokens
    session = make_session(tokenizer, num_workers=1, max_tokens=50)
    session.runs()
    texts = []
    for token_id in emoji_ids:
        session.commit([token_id])
        texts += [e for e in session.take_events() if isinstance(e, TokenEvent)]
        session.runs()
    assert [(e.text, e.token_ids) for e in texts] == [("🙂", tuple(emoji_ids))]


def test_views_mark_sampled_tokens(tokenizer) -> None:
    session = make_session(tokenizer, num_workers=2, max_tokens=50)
    drive(session, tokenizer, [[" a", " b"], [" c", " d"]])
    session.runs()  # feeds the last samples into the cache
    view = session.view(0)
    assert len(view.token_ids) == len(view.is_sampled)
    sampled = [t for t, s in zip(view.token_ids, view.is_sampled, strict=True) if s]
    assert tokenizer.decode(sampled) == " b d a c"  # Bob's step comes before Alice's own step in her view
    assert view.token_ids[-1] == token(tokenizer, " c")


NO_SYSTEM_TEMPLATE = (  # Mistral-Instruct's kind: user and assistant turns only
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
    "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def test_rules_open_the_task_when_the_chat_template_has_no_system_turn(tokenizer) -> None:
    """Such a template raises on a system message; the model would not even pass its warm-up."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = NO_SYSTEM_TEMPLATE
    text = prompts.ChatPrompt.build(plain, ("Alice", "Bob"), "Add 2 and 2.").text
    rules = prompts.collaboration_rules(("Alice", "Bob"))
    assert text.startswith(f"{plain.bos_token}[INST] {rules}\n\nTask: Add 2 and 2. [/INST]")
    assert text.endswith(prompts.PAST_STEPS_HEADER)
    with_system = prompts.ChatPrompt.build(tokenizer, ("Alice", "Bob"), "Add 2 and 2.").text
    assert rules in with_system and "system" in with_system  # a template with a system turn keeps using it


@pytest.mark.parametrize("slack", [0, 1, 2])
def test_no_token_is_fed_past_the_context_when_several_workers_write(tokenizer, slack: int) -> None:
    """Every view holds every block, so a forward that feeds n workers one token each lengthens every view by n:
    the session must end before the last worker's token would sit past the context."""
    a = token(tokenizer, " a")
    probe = make_session(tokenizer, num_workers=3, max_tokens=500, final_answer=False)
    probe.runs()
    context = max(len(probe.view(w.index).token_ids) for w in probe.workers) + 10 + slack
    session = make_session(tokenizer, context, num_workers=3, max_tokens=500, final_answer=False)
    forwards = 0
    while not session.done:
        runs = session.runs()
        if session.done:
            break
        plan = build_forward([(session.cache, runs)], INV_FREQ, torch.float32)
        for group in plan.groups:  # a token's view position: its block's offset in its view + its local position
            view_positions = group.offset.gather(1, group.own[:, None]).flatten() + plan.position_ids[0, group.rows]
            assert int(view_positions.max()) < context
        assert max(len(session.view(w.index).token_ids) for w in session.workers) <= context
        session.commit([a] * len(session.workers))
        forwards += 1
    assert forwards >= 3, "the session should decode until the context is nearly full"
    assert session.take_events()[-1].finish_reasons == ("length",) * 3


def sentencepiece_like_tokenizer():
    """A tokenizer that decodes as Llama 2's and Mistral's do: '▁' is a space and decode strips one leading
    space of the whole text."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    words = ["we", "can", "solve", "it"]
    vocab = {"<unk>": 0, "</s>": 1, "▁": 2} | {f"▁{w}": i + 3 for i, w in enumerate(words)}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    model.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="</s>")


def test_a_first_sampled_word_keeps_its_space_with_a_tokenizer_that_strips_one() -> None:
    """Worker 0's seed ends '... we can'; the model samples '▁solve': the text must read 'we can solve'."""
    tok = sentencepiece_like_tokenizer()
    session = make_session(tok, num_workers=1, max_tokens=10, final_answer=False)
    for word in ("▁solve", "▁it"):
        session.runs()
        session.commit([tok.convert_tokens_to_ids(word)])
    texts = [e.text for e in session.take_events() if isinstance(e, TokenEvent)]
    assert "".join(texts) == " solve it"
    assert session.workers[0].text.endswith("we can solve it")


def metaspace_tokenizer():
    """A tokenizer that encodes as newer Llama 2 and Mistral conversions do: '▁' before the text unless it opens
    with a space (Metaspace, prepend scheme "first")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "▁": 2, "\n": 3, "*": 4, "a": 5, "▁a": 6}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("make_tokenizer", [sentencepiece_like_tokenizer, metaspace_tokenizer])
def test_inserted_texts_get_no_dummy_prefix_space(make_tokenizer) -> None:
    """SentencePiece tokenizers put a '▁' before each text they encode. Inserted into running text, a header after
    a blank line gets none, and the redundancy check, which opens with a space, gets that one space only."""
    tok = make_tokenizer()
    encode, pieces = prompts.InsertedText(tok), tok.convert_ids_to_tokens
    for text in ("**", "\n**"):
        assert pieces(tok.encode(text, add_special_tokens=False))[0] == "▁", "encoded alone, a text gets a '▁'"
    assert pieces(encode("**"))[0] != "▁" and pieces(encode("\n**"))[0] != "▁"
    assert pieces(encode(" a")) == pieces(tok.encode("a", add_special_tokens=False)), "one space, not two"


def merged_blank_line_tokenizer():
    """A byte-level tokenizer with one token for '.\\n\\n', as Qwen's and Llama 3's have (the default model's
    splits the full stop from the blank line)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for extra in ("\u0120solved", ".\u010a\u010a", "<eos>"):
        vocab[extra] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")


def test_a_token_that_ends_the_step_and_its_text_stays_in_that_step() -> None:
    """'.\\n\\n' ends Alice's step: it is fed into her step before the step moves into the history (the full stop
    stays with its sentence, not at the head of her next step, after whatever finished in between); what she
    samples after it belongs to no step, and her next step opens with its header."""
    tok = merged_blank_line_tokenizer()
    solved, full_stop = tok.convert_tokens_to_ids("\u0120solved"), tok.convert_tokens_to_ids(".\u010a\u010a")
    session = make_session(tok, num_workers=2, max_tokens=10, final_answer=False)

    def forward(samples: list[int]) -> list:
        runs = session.runs()
        build_forward([(session.cache, runs)], INV_FREQ, torch.float32)
        session.commit(samples)
        return runs

    forward([solved, solved])  # prefill, then both sample " solved"
    forward([full_stop, solved])  # Alice ends her step with '.\n\n'
    session.take_events()
    alice = forward([solved, solved])[0]
    assert alice.block == FIRST_STEP_BLOCK and alice.token_ids == (full_stop,), "fed into the step it ends"
    assert [e.worker for e in session.take_events() if isinstance(e, TokenEvent)] == [1], "her sample is dropped"
    alice = forward([solved, solved])[0]
    assert alice.token_ids == tuple(tok.encode(prompts.step_header("Alice", 2), add_special_tokens=False))
    history = tok.decode(session.common.ids)
    assert history.endswith("how we can solved.\n\n"), history[-60:]
    assert session.workers[0].generated == 3 and session.workers[0].step == 2  # the dropped sample is not counted
