"""What a message says about images: which one it points at, and what kind of message it is.

Pure text analysis for the router (English, rule-based, explainable). No state, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_NOUN = r"(?:image|picture|photo|photograph|pic|snapshot|screenshot|shot|drawing|painting|one)s?"
_ORDINALS = {
    "first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3, "fourth": 4, "4th": 4,
    "fifth": 5, "5th": 5, "sixth": 6, "6th": 6, "seventh": 7, "7th": 7, "eighth": 8, "8th": 8,
}  # fmt: skip
_ORDINAL_RE = re.compile(rf"\b({'|'.join(_ORDINALS)})\s+(?:{_NOUN})\b")
_NUMBERED_RE = re.compile(r"\b(?:image|picture|photo|photograph|pic)\s*(?:#|no\.?|number)?\s*(\d{1,2})\b")
_LATEST_RE = re.compile(rf"\b(?:last|latest|newest|most recent|new)\s+(?:{_NOUN})\b")
_PREVIOUS_RE = re.compile(rf"\b(?:previous|earlier|prior|other|older|before)\s+(?:{_NOUN})\b|\b(?:{_NOUN}) before\b")
_NOUN_RE = re.compile(r"\b(?:image|picture|photo|photograph|pic|snapshot|screenshot)s?\b")
_PRONOUN_RE = re.compile(r"\b(?:it|its|it's|this|that|these|those|they|them|there|he|she|him|her|his)\b")

_QUESTION_RE = re.compile(
    r"^(?:what|what's|whats|how|how's|who|who's|whom|whose|where|where's|which|why|when|is|are|was|were|"
    r"does|do|did|can|could|would|will|should|has|have|had|count|name|identify|tell me (?:what|how|who|where|"
    r"which|if|whether|why))\b"
)
_DESCRIBE_RE = re.compile(
    r"\b(?:describe|caption|what do you see|what can you see"
    r"|what(?:'s| is) (?:in|on|shown in) (?:it|this|that|the (?:\w+ )?(?:image|picture|photo|pic))\b"
    r"|what(?:'s| is) (?:this|that)(?: (?:image|picture|photo|pic))?\s*\??$"
    r"|tell me about (?:it|this|that|the (?:image|picture|photo|pic)))"
)
_INSTRUCTION_RE = re.compile(
    r"^(?:please\s+|now\s+|can you\s+|could you\s+)?(?:write|compose|create|generate|make up|draft|translate|"
    r"summari[sz]e|rewrite|rephrase|invent|imagine|come up with|suggest|brainstorm|turn (?:it|this|that) into|"
    r"give me (?:a|an|some|three|two|five)|tell me (?:a|another) (?:story|joke))\b"
)
_FOLLOW_UP_RE = re.compile(r"^(?:and|what about|how about|and what about|same for|and for)\b")

RefKind = Literal["ordinal", "latest", "previous", "noun", "pronoun"]


@dataclass(frozen=True)
class ImageRef:
    kind: RefKind
    phrase: str  # the words that made the reference, for the router's reason
    number: int | None = None  # 1-based, for ordinals ("the second photo", "image 2")


def normalise(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").split())


def find_image_ref(text: str) -> ImageRef | None:
    """The strongest image reference in ``text``: an ordinal beats last/previous beats a bare noun
    ("the photo") beats a pronoun ("it", "this")."""
    t = normalise(text)
    if m := _ORDINAL_RE.search(t):
        return ImageRef("ordinal", m.group(0), _ORDINALS[m.group(1)])
    if m := _NUMBERED_RE.search(t):
        return ImageRef("ordinal", m.group(0), int(m.group(1)))
    if m := _LATEST_RE.search(t):
        return ImageRef("latest", m.group(0))
    if m := _PREVIOUS_RE.search(t):
        return ImageRef("previous", m.group(0))
    if m := _NOUN_RE.search(t):
        return ImageRef("noun", m.group(0))
    if m := _PRONOUN_RE.search(t):
        return ImageRef("pronoun", m.group(0))
    return None


def is_question(text: str) -> bool:
    t = normalise(text)
    return t.endswith("?") or bool(_QUESTION_RE.match(t))


def is_describe_request(text: str) -> bool:
    return bool(_DESCRIBE_RE.search(normalise(text)))


def is_instruction(text: str) -> bool:
    """An instruction to produce text ("write a poem about it"), not a question about an image."""
    return bool(_INSTRUCTION_RE.match(normalise(text)))


def is_follow_up(text: str) -> bool:
    """An elliptical follow-up that only changes the image: "and in the first photo?", "what about
    the second one?" (short, starts with and/what about, names an image)."""
    t = normalise(text)
    ref = find_image_ref(t)
    return bool(_FOLLOW_UP_RE.match(t)) and ref is not None and ref.kind != "pronoun" and len(t.split()) <= 8
