"""Routing turns that carry or point at images: table-driven, the router is a pure function."""

from __future__ import annotations

import pytest

from assistant.image_refs import find_image_ref, is_follow_up
from assistant.router import SessionState, TurnRequest, route, split_command

ALL = frozenset({"chat", "caption", "vqa"})
NONE = SessionState()
# Two images; the last turn asked VQA about the second one.
TWO = SessionState(last_skill="vqa", image_ids=("A", "B"), focus_image_id="B", last_question="how many people are there?")
# Three images; the conversation last looked at the first one, then chatted.
THREE = SessionState(last_skill="chat", image_ids=("A", "B", "C"), focus_image_id="A", last_question="what colour is the cup?")

SAME = object()  # the skill sees the turn's text (a slash command stripped)


def T(text: str, *images: str, override: str | None = None) -> TurnRequest:  # noqa: N802
    return TurnRequest(text, images, override, images)


CASES = [
    # (turn, state, skill, attachment_id, text the skill sees, overridden)
    # a new image
    (T("", "N"), NONE, "caption", "N", "", False),
    (T("how many people are there?", "N"), NONE, "vqa", "N", SAME, False),
    (T("Is the woman smiling", "N"), NONE, "vqa", "N", SAME, False),
    (T("describe this photo", "N"), NONE, "caption", "N", SAME, False),
    (T("what's in this picture?", "N"), TWO, "caption", "N", SAME, False),
    (T("write a poem about this", "N"), NONE, "caption", "N", SAME, False),
    (T("my cat", "N"), NONE, "caption", "N", SAME, False),
    (T("is the cat in the first photo too?", "N"), TWO, "vqa", "A", SAME, False),
    (T("", "A"), TWO, "caption", "A", "", False),  # the same image again is still image 1
    (T("and in this one?", "N"), TWO, "vqa", "N", SAME, False),
    # follow-ups about earlier images
    (T("what colour is it?"), TWO, "vqa", "B", SAME, False),
    (T("what colour is it?"), THREE, "vqa", "A", SAME, False),
    (T("and in the first photo?"), TWO, "vqa", "A", "how many people are there?", False),
    (T("what about the second one?"), THREE, "vqa", "B", "what colour is the cup?", False),
    (T("and in the first photo?"), SessionState(image_ids=("A",)), "vqa", "A", SAME, False),
    (T("how many people are in the second picture?"), TWO, "vqa", "B", SAME, False),
    (T("how many cats are in the third photo?"), TWO, "vqa", None, SAME, False),
    (T("describe the last image"), THREE, "caption", "C", SAME, False),
    (T("what's in the previous picture?"), THREE, "caption", "B", SAME, False),
    (T("describe image 2"), THREE, "caption", "B", SAME, False),
    (T("photo #1: what is on the table?"), THREE, "vqa", "A", SAME, False),
    (T("What's the colour of the cup in the second photo?"), THREE, "vqa", "B", SAME, False),
    (T("Is it sunny in the photo?"), THREE, "vqa", "A", SAME, False),
    (T("what do you see?"), TWO, "caption", "B", SAME, False),
    (T("how many people are there?"), TWO, "vqa", "B", SAME, False),
    # instructions and other text go to chat
    (T("write a short poem about it"), TWO, "chat", None, SAME, False),
    (T("Write a haiku about the first photo"), TWO, "chat", None, SAME, False),
    (T("Can you write a story about the rocket?"), THREE, "chat", None, SAME, False),
    (T("tell me a joke"), TWO, "chat", None, SAME, False),
    (T("what is 2+2?"), TWO, "chat", None, SAME, False),
    (T("hello there"), TWO, "chat", None, SAME, False),
    (T("what is in the picture?"), NONE, "chat", None, SAME, False),
    (T("how many people are there?"), NONE, "chat", None, SAME, False),
    (T("what colour is it?"), NONE, "chat", None, SAME, False),
    # overrides win
    (T("/caption"), TWO, "caption", "B", "", True),
    (T("/describe the first one"), TWO, "caption", "A", "the first one", True),
    (T("/ask what colour is the sky?"), TWO, "vqa", "B", "what colour is the sky?", True),
    (T("/ask and in the first photo?"), TWO, "vqa", "A", "how many people are there?", True),
    (T("/chat what is in the first photo?"), TWO, "chat", None, "what is in the first photo?", True),
    (T("what colour is it?", override="chat"), TWO, "chat", None, SAME, True),
    (T("", "N", override="vqa"), NONE, "vqa", "N", "", True),
    (T("tell me about it", override="caption"), NONE, "caption", None, SAME, True),
    (T("a poem please", override="vqa"), THREE, "vqa", "A", SAME, True),
]


@pytest.mark.parametrize(("turn", "state", "skill", "image", "text", "overridden"), CASES)
def test_vision_routes(turn: TurnRequest, state: SessionState, skill: str, image, text, overridden: bool) -> None:  # noqa: ANN001
    d = route(turn, state, ALL)
    expected_text = split_command(turn.text)[1] if text is SAME else text
    assert (d.skill, d.attachment_id, d.text, d.overridden) == (skill, image, expected_text, overridden), d.reason
    assert 0 < d.confidence <= 1 and d.reason


def test_decisions_say_which_image_and_how_sure() -> None:
    new = route(T("", "N"), TWO, ALL)
    assert new.confidence >= 0.9 and "image 3" in new.reason  # numbered over the whole session
    follow = route(T("and in the first photo?"), TWO, ALL)
    assert "image 1" in follow.reason and "how many people are there?" in follow.reason
    missing = route(T("how many cats are in the third photo?"), TWO, ALL)
    assert "image 3" in missing.reason and "has 2" in missing.reason and missing.confidence < 0.9
    none = route(T("what is in the picture?"), NONE, ALL)
    assert "no image" in none.reason and "upload" in none.reason
    # "it" after a vision turn is surer than "it" after chat
    assert route(T("what colour is it?"), TWO, ALL).confidence > route(T("what colour is it?"), THREE, ALL).confidence


def test_vision_rules_fall_back_to_chat_when_the_skill_is_not_offered() -> None:
    d = route(T("", "N"), NONE, frozenset({"chat"}))
    assert d.skill == "chat" and d.attachment_id is None and "no caption skill" in d.reason and d.confidence < 0.5


def test_image_references() -> None:
    assert find_image_ref("And in the FIRST photo?").number == 1  # type: ignore[union-attr]
    assert find_image_ref("the 3rd picture").number == 3  # type: ignore[union-attr]
    assert find_image_ref("picture 2 please").number == 2  # type: ignore[union-attr]
    assert find_image_ref("the last one").kind == "latest"  # type: ignore[union-attr]
    assert find_image_ref("is it red").kind == "pronoun"  # type: ignore[union-attr]
    assert find_image_ref("hello world") is None
    assert is_follow_up("and in the first photo?") and is_follow_up("what about the second one?")
    assert not is_follow_up("and then what happened?") and not is_follow_up("how many people are in the first photo?")
