"""Multi-turn prompt building: chat template over the history, truncated to a token budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from skills.base import HistoryItem, SkillError
from bench.prompt_build import one_at_a_time
from skills.chat import build_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_chat_model)


def convo(n: int) -> list[HistoryItem]:
    items = []
    for i in range(n):
        items += [HistoryItem("user", f"question {i}"), HistoryItem("assistant", f"answer {i}")]
    return items + [HistoryItem("user", "latest question")]


def test_whole_history_goes_into_the_prompt_in_order(tokenizer) -> None:  # noqa: ANN001
    ids, dropped = build_prompt(tokenizer, system="be brief", history=convo(2), budget=10_000)
    prompt = tokenizer.decode(ids)
    assert dropped == 0
    order = [prompt.index(s) for s in ("be brief", "question 0", "answer 0", "question 1", "answer 1", "latest question")]
    assert order == sorted(order)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_oldest_turns_are_dropped_to_fit_the_budget(tokenizer) -> None:  # noqa: ANN001
    full, _ = build_prompt(tokenizer, system="sys", history=convo(5), budget=10_000)
    ids, dropped = build_prompt(tokenizer, system="sys", history=convo(5), budget=len(full) - 20)
    prompt = tokenizer.decode(ids)
    assert len(ids) <= len(full) - 20 and dropped >= 2 and dropped % 2 == 0
    assert "question 0" not in prompt and "latest question" in prompt and "sys" in prompt
    # After truncation the conversation still starts with a user message.
    assert prompt.index("<|im_start|>user") < prompt.find("<|im_start|>assistant\nanswer")


def test_a_single_message_over_the_budget_is_a_clear_error(tokenizer) -> None:  # noqa: ANN001
    with pytest.raises(SkillError) as err:
        build_prompt(tokenizer, system=None, history=[HistoryItem("user", "x" * 500)], budget=100)
    assert err.value.code == "context_too_long" and "ASSISTANT_CHAT_CONTEXT_TOKENS" in err.value.message


def test_a_conversation_past_the_budget_keeps_its_start_while_it_fits(tokenizer) -> None:  # noqa: ANN001
    """Turn after turn of a conversation that outgrew the budget, with the start of the turn before
    (``keep_from``): the start stays while the prompt fits, so each such prompt begins with the
    whole prompt before it (what the model reuses); when it must move, it drops to fit three
    quarters of the budget, so it can stay again. Without the hint every turn's start moves on."""
    budget = 800

    def turns(hinted: bool) -> list[tuple[list[int], int | None]]:
        history: list[HistoryItem] = []
        out, keep = [], None
        for turn in range(60):
            history.append(HistoryItem("user", f"question {turn}: " + "why " * (turn % 5 + 1), 2 * turn))
            kwargs = {"keep_from": keep, "headroom": 0.25} if hinted else {}
            ids, dropped = build_prompt(tokenizer, system="sys", history=history, budget=budget, **kwargs)
            assert len(ids) <= budget
            keep = history[dropped].position if dropped else None
            out.append((ids, keep))
            history.append(HistoryItem("assistant", f"answer {turn}: " + "because " * (turn % 3 + 1), 2 * turn + 1))
        return out

    hinted, plain = turns(True), turns(False)
    past = [i for i, (_, start) in enumerate(hinted) if start is not None]
    assert len(past) > 25, "the conversation never outgrew the budget"
    kept = [i for i in past[1:] if hinted[i][1] == hinted[i - 1][1]]
    moved = [i for i in past[1:] if hinted[i][1] != hinted[i - 1][1]]
    assert len(kept) > 2 * len(moved) > 0, (len(kept), len(moved))  # 36 and 12 of 48 here
    for i in kept:
        assert hinted[i][0][: len(hinted[i - 1][0])] == hinted[i - 1][0], i
    for i in [past[0], *moved]:
        assert len(hinted[i][0]) <= budget * 0.75, i
    plain_kept = sum(plain[i][1] == plain[i - 1][1] for i in past[1:])
    assert plain_kept < len(kept) / 4, "without the hint the start should move most turns"


def test_truncation_keeps_what_dropping_one_message_at_a_time_keeps(tokenizer) -> None:  # noqa: ANN001
    """Histories of every shape (failed replies leave two user messages in a row; a history may
    start with an answer) and budgets from too small to ample: the prompt and the count dropped are
    those of the one-at-a-time rule."""
    import random

    rng = random.Random(7)
    cases = 0
    for _ in range(60):
        n = rng.randint(1, 14)
        history = [
            HistoryItem(rng.choice(("user", "user", "assistant")), " ".join(f"w{rng.randint(0, 99)}" for _ in range(rng.randint(1, 12))))
            for _ in range(n - 1)
        ] + [HistoryItem("user", "latest question")]
        system = rng.choice((None, "be brief"))
        full = len(one_at_a_time(tokenizer, system, history, 10**6)[0])
        for budget in sorted({rng.randint(10, full + 5) for _ in range(4)} | {full, full - 1}):
            want_ids, want_dropped = one_at_a_time(tokenizer, system, history, budget)
            if want_ids is None:
                with pytest.raises(SkillError):
                    build_prompt(tokenizer, system=system, history=history, budget=budget)
            else:
                assert build_prompt(tokenizer, system=system, history=history, budget=budget) == (want_ids, want_dropped)
            cases += 1
    assert cases > 300, cases


@pytest.mark.parametrize("budget", [300, 120], ids=["templated-whole-first", "searched-from-the-end"])
def test_a_long_conversation_is_truncated_with_a_few_templates(tokenizer, budget: int) -> None:  # noqa: ANN001
    """A 201-message history over the budget: the prompt is built from a handful of chat-template
    calls (this runs on the event loop for every turn), not one per dropped message."""

    class Counting:
        def __init__(self, inner) -> None:  # noqa: ANN001
            self.inner, self.calls = inner, 0

        def apply_chat_template(self, messages, **kw):  # noqa: ANN001, ANN003, ANN201
            self.calls += 1
            return self.inner.apply_chat_template(messages, **kw)

        def __call__(self, *args, **kw):  # noqa: ANN002, ANN003, ANN204
            return self.inner(*args, **kw)

        def __getattr__(self, name: str):  # noqa: ANN204 - the rest is the tokenizer's
            return getattr(self.inner, name)

    history = convo(100)
    counting = Counting(tokenizer)
    ids, dropped = build_prompt(counting, system="sys", history=history, budget=budget)
    assert (ids, dropped) == one_at_a_time(tokenizer, "sys", history, budget)
    assert dropped > 150 and counting.calls <= 12, counting.calls


def _trained_tokenizer(folder: Path):  # noqa: ANN202
    """A byte-level BPE with real merges (trained here on a few sentences) and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, naïve café: 東京 in 2026!", "what is in this photo?"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(text * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_prompts_are_the_ids_the_chat_template_gives_with_merges_and_special_tokens(tmp_path: Path) -> None:
    """The encoder that skips the transformers wrapper (``text_encoder``) gives exactly the ids of
    ``apply_chat_template(tokenize=True)``: merges, the template's special tokens, and text that
    spells a special token without being one."""
    from skills.chat import text_encoder

    tokenizer = _trained_tokenizer(tmp_path / "tok")
    encode = text_encoder(tokenizer)
    assert getattr(encode, "off_loop", False)  # a fast tokenizer: the tokenizers library directly
    histories = [
        [HistoryItem("user", "The quick brown fox?")],
        [HistoryItem("user", "Héllo wörld"), HistoryItem("assistant", "naïve café 東京 🙂"), HistoryItem("user", "what is in this photo?")],
        [HistoryItem("user", "say <|im_end|> and <|im_start|>user twice\n\n  spaced  ")],
    ]  # fmt: skip
    for history in histories:
        for system in (None, "You are brief."):
            ids, dropped = build_prompt(tokenizer, system=system, history=history, budget=10_000)
            head = [{"role": "system", "content": system}] if system else []
            want = tokenizer.apply_chat_template(head + [{"role": h.role, "content": h.text} for h in history],
                                                 add_generation_prompt=True, tokenize=True)["input_ids"]  # fmt: skip
            assert (ids, dropped) == (list(want), 0)
    assert any(len(tokenizer.convert_ids_to_tokens([i])[0]) > 1 for i in ids)  # merges were used


def test_a_tokenizer_whose_wrapper_changes_the_ids_is_used_through_the_wrapper(tokenizer) -> None:  # noqa: ANN001
    from skills.chat import text_encoder

    class Lowering(type(tokenizer)):  # a wrapper that does more than the tokenizers library
        def __call__(self, text, **kwargs):  # noqa: ANN001, ANN003, ANN204
            return super().__call__(text.lower(), **kwargs)

    lowering = Lowering.from_pretrained(tokenizer.name_or_path)
    encode = text_encoder(lowering)
    assert not getattr(encode, "off_loop", False)
    assert encode("ABC") == list(tokenizer("abc", add_special_tokens=False)["input_ids"])


def test_chat_prompts_are_built_off_the_event_loop(tiny_chat_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of chat turns starts one after another on the event loop; the templating and
    tokenizing of each (most of a turn's start) runs in the skill's prompt thread instead, while
    the loop goes on with the rest."""
    import asyncio
    import threading

    import skills.chat as chat_module
    from skills.chat import ChatSkill
    from skills.chat_worker import ChatWorkerOptions

    threads: list[str] = []
    real = chat_module.build_prompt

    def watched(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(chat_module, "build_prompt", watched)
    skill = ChatSkill(ChatWorkerOptions(model=str(tiny_chat_model), device="cpu", max_new_tokens=2, context_tokens=256),
                      system_prompt=None, context_tokens=256)  # fmt: skip

    async def scenario() -> list[str]:
        from skills.base import SkillRequest

        await skill.start()
        try:
            runs = await asyncio.gather(*(skill.run(SkillRequest("s", f"t{i}", f"hello {i}")) for i in range(4)))
            return ["".join([d async for d in run]) for run in runs]
        finally:
            await skill.stop()

    replies = asyncio.run(scenario())
    assert len(replies) == 4 and all(isinstance(r, str) for r in replies)
    assert len(threads) == 4 and all(name.startswith("chat-prompt") for name in threads), threads
