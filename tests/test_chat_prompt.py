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

    history = convo(100)
    counting = Counting(tokenizer)
    ids, dropped = build_prompt(counting, system="sys", history=history, budget=budget)
    assert (ids, dropped) == one_at_a_time(tokenizer, "sys", history, budget)
    assert dropped > 150 and counting.calls <= 12, counting.calls
