"""The skill interface shared by every skill (chat now; vision and speech plug in the same way)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

SkillStateName = Literal["loading", "ready", "unavailable", "disabled"]


class SkillError(Exception):
    """A turn the skill cannot complete; ``code`` is one of ``assistant.protocol.ErrorCode``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple:  # crosses process boundaries (skills.model_process) intact
        return (type(self), (self.code, self.message))


@dataclass(frozen=True)
class HistoryItem:
    role: Literal["user", "assistant"]
    text: str
    position: int | None = None  # the message's place in its session (state.models.Message.position)


@dataclass(frozen=True)
class SkillRequest:
    session_id: str
    turn_id: str
    text: str
    # Earlier messages of the session, oldest first, not including this turn.
    history: tuple[HistoryItem, ...] = ()
    attachment_ids: tuple[str, ...] = ()
    # The image(s) the turn is about (as resolved by the router), encoded bytes; vision skills read them.
    images: tuple[bytes, ...] = ()


@dataclass
class SkillUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, those whose keys and values the model held already


class SkillRun(Protocol):
    """One running turn: iterate it for text deltas; ``cancel()`` stops the work and frees its slot."""

    usage: SkillUsage

    def __aiter__(self) -> AsyncIterator[str]: ...

    def cancel(self) -> None: ...


@dataclass
class SkillStatus:
    state: SkillStateName
    detail: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Skill(Protocol):
    """A skill may also have ``expect(turns)``: called on the event loop with the number of turns
    routed to it in the transaction that admits them, before their ``run``s (``ChatSkill``: chat
    first on a GPU)."""

    name: str

    def status(self) -> SkillStatus: ...

    async def start(self) -> None:
        """Load models (off the event loop). Must not raise: a failure becomes status 'unavailable'."""

    async def stop(self) -> None: ...

    async def wait_ready(self) -> None:
        """Wait while loading; raise ``SkillError('skill_unavailable', ...)`` if it cannot serve."""

    async def run(self, request: SkillRequest) -> SkillRun: ...


class ModelFreeSkill:
    """Base for a skill with nothing to load (fakes in tests, the benchmarks' flood skill): always ready."""

    name = "skill"

    def status(self) -> SkillStatus:
        return SkillStatus(state="ready")

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def wait_ready(self) -> None:
        return None
