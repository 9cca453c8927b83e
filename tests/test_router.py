"""The router is a pure function: table-driven cases."""

from __future__ import annotations

import pytest

from assistant.router import Decision, SessionState, TurnRequest, UnknownSkill, route, split_command

AVAILABLE = frozenset({"chat"})


@pytest.mark.parametrize(
    ("turn", "skill", "overridden", "text"),
    [
        (TurnRequest("hello"), "chat", False, "hello"),
        (TurnRequest("what is 2+2?"), "chat", False, "what is 2+2?"),
        (TurnRequest("/chat tell me a joke"), "chat", True, "tell me a joke"),
        (TurnRequest("  /CHAT shout"), "chat", True, "shout"),
        (TurnRequest("/unknown stays text"), "chat", False, "/unknown stays text"),
        (TurnRequest("a path /chat in the middle"), "chat", False, "a path /chat in the middle"),
        (TurnRequest("hi", override="chat"), "chat", True, "hi"),
    ],
)
def test_routes(turn: TurnRequest, skill: str, overridden: bool, text: str) -> None:
    decision = route(turn, SessionState(), AVAILABLE)
    assert (decision.skill, decision.overridden, decision.text) == (skill, overridden, text)
    assert 0 < decision.confidence <= 1 and decision.reason


def test_override_wins_with_full_confidence_and_says_why() -> None:
    decision = route(TurnRequest("anything", override="chat"), SessionState(last_skill="chat"), AVAILABLE)
    assert decision == Decision("chat", 1.0, "the user asked for the chat skill", True, "anything")


def test_unknown_override_is_refused() -> None:
    with pytest.raises(UnknownSkill):
        route(TurnRequest("x", override="vqa"), SessionState(), AVAILABLE)


def test_split_command() -> None:
    assert split_command("/chat  hi") == ("chat", "hi")
    assert split_command("hi /chat") == (None, "hi /chat")
