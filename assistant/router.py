"""The intent router: a pure function of (turn, session state) to a decision.

Rules are explainable and tried in order; an explicit override (protocol field or a leading
``/skill`` command) always wins. Vision and speech skills add their rules here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Slash commands a user can type at the start of a message, and the skill each selects.
COMMANDS = {"/chat": "chat"}
_COMMAND_RE = re.compile(r"^\s*(/[a-z]+)\b\s*", re.IGNORECASE)


@dataclass(frozen=True)
class TurnRequest:
    text: str
    attachment_ids: tuple[str, ...] = ()
    override: str | None = None  # skill named in the protocol's ``skill`` field


@dataclass(frozen=True)
class SessionState:
    last_skill: str | None = None
    image_ids: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Decision:
    skill: str
    confidence: float
    reason: str
    overridden: bool = False
    text: str = ""  # the text the skill should see (a slash command stripped)


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
        return Decision(turn.override, 1.0, f"the user asked for the {turn.override} skill", True, text)
    if command is not None:
        return Decision(command, 1.0, f"the message starts with /{command}", True, text)
    return Decision("chat", 0.9, "text with no image or audio: chat generation answers it", False, text)
