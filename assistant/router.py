"""The intent router: a pure function of (turn, session state) to a decision.

Rules are explainable and tried in order; an explicit override (protocol field or a leading
``/skill`` command) always wins. Vision and speech skills add their rules here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from assistant.image_refs import find_image_ref, is_describe_request, is_follow_up, is_instruction, is_question

# Slash commands a user can type at the start of a message, and the skill each selects.
COMMANDS = {"/chat": "chat", "/caption": "caption", "/describe": "caption", "/ask": "vqa", "/vqa": "vqa"}
VISION_SKILLS = frozenset({"caption", "vqa"})
_COMMAND_RE = re.compile(r"^\s*(/[a-z]+)\b\s*", re.IGNORECASE)


@dataclass(frozen=True)
class TurnRequest:
    text: str
    attachment_ids: tuple[str, ...] = ()
    override: str | None = None  # skill named in the protocol's ``skill`` field
    image_ids: tuple[str, ...] = ()  # images attached to this turn, in order


@dataclass(frozen=True)
class SessionState:
    last_skill: str | None = None
    # The session's image registry: images sent in earlier turns, in order of first appearance
    # (newest last); "the first photo" is image_ids[0].
    image_ids: tuple[str, ...] = field(default_factory=tuple)
    # The image the conversation was last about (what "it" points at), and the last question asked
    # of the VQA skill (repeated by follow-ups such as "and in the first photo?").
    focus_image_id: str | None = None
    last_question: str | None = None


@dataclass(frozen=True)
class Decision:
    skill: str
    confidence: float
    reason: str
    overridden: bool = False
    text: str = ""  # the text the skill should see (a slash command stripped)
    attachment_id: str | None = None  # the image the turn is about, when resolved


class UnknownSkill(ValueError):
    pass


def split_command(text: str) -> tuple[str | None, str]:
    """``"/chat hello"`` -> ``("chat", "hello")``; text without a known command -> ``(None, text)``."""
    m = _COMMAND_RE.match(text)
    if m and m.group(1).lower() in COMMANDS:
        return COMMANDS[m.group(1).lower()], text[m.end() :]
    return None, text


def route(turn: TurnRequest, state: SessionState, available: frozenset[str]) -> Decision:
    command, text = split_command(turn.text)
    if turn.override is not None:
        if turn.override not in available:
            raise UnknownSkill(turn.override)
        return _forced(turn.override, f"the user asked for the {turn.override} skill", text, turn, state)
    if command is not None:
        if command not in available:
            raise UnknownSkill(command)
        word = _COMMAND_RE.match(turn.text).group(1).lower()  # type: ignore[union-attr]
        return _forced(command, f"the message starts with {word}", text, turn, state)
    decision = vision_rule(text, turn, state)
    if decision is None:
        return Decision("chat", 0.9, "text with no image or audio: chat generation answers it", False, text)
    if decision.skill not in available:
        return Decision(
            "chat",
            0.4,
            f"{decision.reason}, but this server offers no {decision.skill} skill; chat answers without seeing it",
            False,
            text,
        )
    return decision


# ----------------------------------------------------------------------------- images


def _registry(turn: TurnRequest, state: SessionState) -> tuple[str, ...]:
    """Earlier images then this turn's new ones, each once."""
    return tuple(dict.fromkeys((*state.image_ids, *turn.image_ids)))


def resolve_image(text: str, turn: TurnRequest, state: SessionState) -> tuple[str | None, str]:
    """(image id or None, how it was chosen). Ordinals count over the whole session, oldest first."""
    images = _registry(turn, state)
    ref = find_image_ref(text)
    if ref is not None and ref.kind == "ordinal":
        n = ref.number or 0
        if 1 <= n <= len(images):
            return images[n - 1], f"'{ref.phrase}' is image {n}"
        return None, f"'{ref.phrase}' asks for image {n}, but this session has {len(images)}"
    if ref is not None and ref.kind == "latest" and images:
        return images[-1], f"'{ref.phrase}' is image {len(images)}"
    if ref is not None and ref.kind == "previous" and images:
        earlier = state.image_ids if turn.image_ids else images[:-1] or images
        if earlier:
            return earlier[-1], f"'{ref.phrase}' is image {images.index(earlier[-1]) + 1}"
    if turn.image_ids:
        new = turn.image_ids[-1]
        return new, f"the image sent with this message (image {images.index(new) + 1})"
    if state.focus_image_id in images:
        n = images.index(state.focus_image_id) + 1  # type: ignore[arg-type]
        return state.focus_image_id, f"image {n}, the one the conversation was last about"
    if images:
        return images[-1], f"image {len(images)}, the newest"
    return None, "this session has no image"


def _forced(skill: str, why: str, text: str, turn: TurnRequest, state: SessionState) -> Decision:
    if skill not in VISION_SKILLS:
        return Decision(skill, 1.0, why, True, text)
    image, how = resolve_image(text, turn, state)
    if skill == "vqa" and is_follow_up(text) and state.last_question:
        text = state.last_question
    return Decision(skill, 1.0, f"{why}; {how}", True, text, image)


def vision_rule(text: str, turn: TurnRequest, state: SessionState) -> Decision | None:
    """The rules for turns that carry or point at an image; None when the turn is not about one."""
    has_text = bool(text.strip())
    images = _registry(turn, state)
    if turn.image_ids:
        image, how = resolve_image(text, turn, state)
        if not has_text:
            return Decision("caption", 0.95, f"a new image with no text: captioning describes it ({how})", False, text, image)
        if is_describe_request(text):
            return Decision("caption", 0.9, f"a new image and a request to describe it ({how})", False, text, image)
        if is_follow_up(text) and state.last_question:
            return Decision("vqa", 0.8, f"a follow-up repeating the last question ({how})", False, state.last_question, image)
        if is_instruction(text):
            return Decision(
                "caption", 0.55,
                f"a new image with an instruction, not a question: captioning describes it first, so that chat "
                f"can use the description next turn ({how})", False, text, image,
            )  # fmt: skip
        if is_question(text):
            return Decision("vqa", 0.85, f"a new image with a question: visual question answering ({how})", False, text, image)
        return Decision("caption", 0.7, f"a new image with a remark, not a question: captioning describes it ({how})", False, text, image)
    if is_instruction(text):
        if images:
            return Decision(
                "chat", 0.85,
                "an instruction to write something, not a question about an image: chat generation answers it "
                "with what the vision skills said about the images earlier in the conversation", False, text,
            )  # fmt: skip
        return None
    ref = find_image_ref(text)
    describe = is_describe_request(text)
    if ref is None and describe and images:  # "what do you see?"
        image, how = resolve_image(text, turn, state)
        return Decision("caption", 0.7, f"asks what is to be seen ({how})", False, text, image)
    if ref is None or not (is_question(text) or describe or is_follow_up(text)):
        return None
    if ref.kind == "pronoun":
        # "it"/"this" may mean anything; it means an image when the session has one to mean.
        if not images:
            return None
        image, how = resolve_image(text, turn, state)
        confidence = 0.75 if state.last_skill in VISION_SKILLS else 0.6
        if describe:
            return Decision("caption", confidence, f"asks to describe '{ref.phrase}' ({how})", False, text, image)
        return Decision("vqa", confidence, f"a question about '{ref.phrase}', taken as {how}", False, text, image)
    if not images:
        return Decision(
            "chat", 0.6,
            f"mentions '{ref.phrase}' but this session has no image yet (chat cannot see images; upload one first)",
            False, text,
        )  # fmt: skip
    image, how = resolve_image(text, turn, state)
    if image is None:
        skill = "caption" if describe else "vqa"
        return Decision(skill, 0.5, f"a question about an image that does not exist: {how}", False, text, None)
    if is_follow_up(text) and state.last_question:
        return Decision("vqa", 0.8, f"a follow-up repeating the last question \"{state.last_question}\" about {how}", False, state.last_question, image)
    if describe:
        return Decision("caption", 0.85, f"asks to describe an image ({how})", False, text, image)
    return Decision("vqa", 0.9, f"a question about an image ({how})", False, text, image)
