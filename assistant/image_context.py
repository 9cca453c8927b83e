"""The session's images as the dialogue sees them: the image registry for the router, labels for the
history (late fusion: "[image 1] how many people?" followed by the VQA answer), and checks on the
ids a turn refers to. Reads rows; writes nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from assistant.image_refs import is_follow_up
from assistant.router import split_command
from state.attachments import AttachmentRef, BlobStore
from state.context import ContextRow
from state.models import Attachment


@dataclass(frozen=True)
class ImageContext:
    image_ids: tuple[str, ...]  # the registry: images sent in turns, first appearance order
    focus_image_id: str | None  # the image the last turn about an image was about
    last_question: str | None  # the last question answered by VQA (follow-ups repeat it)
    labels: dict[str, str]  # turn_id -> "[image 1] " prefix for that turn's user message

    def render_user(self, message: ContextRow) -> str:
        label = self.labels.get(message.turn_id, "")
        return f"{label}{message.text}".strip() if label else message.text


def turn_attachments(
    refs: Mapping[str, AttachmentRef], *, user_id: str, ids: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(unknown ids, image ids) for the ids a turn refers to: an id is unknown unless it is an
    attachment of ``user_id`` among ``refs`` (the session's, from ``attachment_refs``)."""
    known = [i for i in ids if i in refs and refs[i].user_id == user_id]
    unknown = [i for i in ids if i not in known]
    images = list(dict.fromkeys(i for i in known if refs[i].kind == "image"))
    return unknown, images


def mentions_attachments(messages: Sequence[ContextRow]) -> bool:
    """Whether any of these messages names an attachment (only then are the session's looked up)."""
    return any(m.attachment_ids for m in messages)


def own_question(text: str) -> str | None:
    """The question a user message asked of its own (not a bare /command, not a follow-up that
    repeats the last one), or None: what ``last_question`` is taken from."""
    _, question = split_command(text)
    return question.strip() if question.strip() and not is_follow_up(question) else None


def asked(text: str) -> bool:
    """Whether ``own_question`` finds one (``state.context`` reads older VQA turns back to one)."""
    return own_question(text) is not None


def image_context(
    refs: Mapping[str, AttachmentRef], *, messages: Sequence[ContextRow], before: int | None = None
) -> ImageContext:
    """``refs``: the session's attachments (``attachment_refs``); may be empty when no message
    ``mentions_attachments``. The registry is the images that user messages before position
    ``before`` (all, if None) named, numbered in the order they were first named; ``messages`` (see
    ``state.context``) give the rest."""
    images = {i for i, a in refs.items() if a.kind == "image"}
    firsts = sorted(
        (a.first_position, a.first_index, i)
        for i, a in refs.items()
        if i in images and a.first_position is not None and (before is None or a.first_position < before)
    )
    registry = [i for _, _, i in firsts]
    number = {i: n for n, i in enumerate(registry, 1)}
    focus: str | None = None
    last_question: str | None = None
    user_text: dict[str, str] = {}
    about: dict[str, list[str]] = {}  # turn_id -> the images the turn was about
    for m in messages:
        ids = [i for i in (m.attachment_ids or []) if i in images]
        if m.role == "user":
            user_text[m.turn_id] = m.text
            if ids:
                about[m.turn_id] = ids
        elif ids:  # the reply stores the image the router resolved
            about.setdefault(m.turn_id, ids)
        if ids:
            focus = ids[-1]
        if m.role == "assistant" and m.skill == "vqa" and m.status == "completed":
            last_question = own_question(user_text.get(m.turn_id, "")) or last_question
    labels = {turn_id: "".join(f"[image {number[i]}] " for i in ids if i in number) for turn_id, ids in about.items()}
    return ImageContext(tuple(registry), focus, last_question, labels)


def image_bytes(db: Session, blobs: BlobStore, *, attachment_id: str) -> bytes:
    """The bytes a vision model should see (EXIF orientation applied). Raises FileNotFoundError."""
    row = db.get(Attachment, attachment_id)
    if row is None:
        raise FileNotFoundError(attachment_id)
    return blobs.read(row.meta.get("display_sha256", row.sha256))
