"""Multi-turn prompt building: chat template over the history, truncated to a token budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from skills.base import HistoryItem, SkillError
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
