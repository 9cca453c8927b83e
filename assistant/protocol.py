"""Every event that crosses the websocket, as pydantic models.

Client events are parsed with ``parse_client_event``; server events are built from the models below
and serialised with ``dump_event``. Nothing else is sent or received. The AsyncAPI document
(``assistant.asyncapi``) is generated from these models.

Envelope: ``type`` (dotted resource.verb), a client-chosen ``event_id`` echoed in replies and
errors, a server ``seq`` (monotonic per session, for resume), ``session_id`` and ``turn_id``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = "1.1"  # 1.1: session.resume {batch} and session.replay
REPLAY_BATCH_CHARS = 256 * 1024  # characters of events a session.replay frame holds, at most (but one event)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- client events


class _ClientEvent(_Event):
    event_id: str | None = Field(default=None, max_length=128, description="Chosen by the client, echoed back.")


class SessionCreate(_ClientEvent):
    """Start a new session; answered by ``session.created``."""

    type: Literal["session.create"] = "session.create"
    title: str | None = Field(default=None, max_length=200)


class SessionResume(_ClientEvent):
    """Attach to an existing session; the server replays the events with ``seq > last_seq``
    (a reply that has ended as its ``response.done``, whose ``text`` is the whole reply, without
    its ``response.delta``s; so seqs may skip), then answers ``session.resumed`` and streams live events."""

    type: Literal["session.resume"] = "session.resume"
    session_id: str = Field(max_length=64)
    last_seq: int = Field(default=0, ge=0)
    batch: bool = Field(
        default=False,
        description="Replay in ``session.replay`` frames that hold many events each, instead of a frame per"
        " event: a browser takes in a long conversation's few large frames much sooner than its"
        " hundreds of small ones (since protocol 1.1).",
    )


class TurnCreate(_ClientEvent):
    """A user turn. Answered by ``turn.created`` (and ``turn.queued`` when the session is busy),
    then ``turn.routed``, ``response.delta``* and ``response.done``."""

    type: Literal["turn.create"] = "turn.create"
    session_id: str = Field(max_length=64)
    text: str = ""
    attachment_ids: list[str] = Field(default_factory=list, max_length=16)
    skill: str | None = Field(default=None, max_length=32, description="Override the router: run this skill.")


class ResponseCancel(_ClientEvent):
    """Stop a running or queued turn; answered by ``response.done`` with status ``cancelled``."""

    type: Literal["response.cancel"] = "response.cancel"
    session_id: str = Field(max_length=64)
    turn_id: str = Field(max_length=64)


class Ping(_ClientEvent):
    type: Literal["ping"] = "ping"


class AudioStart(_ClientEvent):
    """Open the connection's audio buffer for a session. Then send audio as binary frames: raw PCM16
    little-endian, mono, 16 kHz. ``audio.commit`` transcribes what was sent; ``review`` asks for the
    transcript only (no turn is created: the client edits it and sends a ``turn.create``)."""

    type: Literal["audio.start"] = "audio.start"
    session_id: str = Field(max_length=64)
    format: Literal["pcm16"] = "pcm16"
    sample_rate: Literal[16000] = 16000
    review: bool = False


class AudioCommit(_ClientEvent):
    """Close the buffer: the server answers ``transcript.final`` and, unless reviewing, runs the turn."""

    type: Literal["audio.commit"] = "audio.commit"
    session_id: str = Field(max_length=64)


class AudioClear(_ClientEvent):
    """Drop the audio sent since ``audio.start``."""

    type: Literal["audio.clear"] = "audio.clear"
    session_id: str = Field(max_length=64)


ClientEvent = Annotated[
    Union[SessionCreate, SessionResume, TurnCreate, ResponseCancel, Ping, AudioStart, AudioCommit, AudioClear],
    Field(discriminator="type"),
]
CLIENT_EVENT_TYPES = (
    "session.create",
    "session.resume",
    "turn.create",
    "response.cancel",
    "ping",
    "audio.start",
    "audio.commit",
    "audio.clear",
)

# ----------------------------------------------------------------------------- server events


class TurnStatus(StrEnum):
    """Lifecycle of a turn (stored on its assistant message)."""

    received = "received"
    queued = "queued"
    routed = "routed"
    running = "running"
    completed = "completed"
    cancelled = "cancelled"
    failed = "failed"
    interrupted = "interrupted"


FINAL_STATUSES = frozenset({TurnStatus.completed, TurnStatus.cancelled, TurnStatus.failed, TurnStatus.interrupted})


class _ServerEvent(_Event):
    event_id: str | None = Field(default=None, description="The client's event_id this answers, if any.")
    seq: int | None = Field(default=None, description="Per-session sequence number; absent on connection events.")


class SkillState(BaseModel):
    name: str
    ready: bool
    state: Literal["loading", "ready", "unavailable", "disabled"]
    detail: str | None = None


class ServerHello(_ServerEvent):
    """First event on every connection: the protocol version and what the server can do."""

    type: Literal["server.hello"] = "server.hello"
    protocol_version: str = PROTOCOL_VERSION
    server_version: str
    user: str
    skills: list[SkillState]
    limits: dict[str, int]
    model_profile: str | None = Field(
        default=None, description="standard (models by name), offline (prepared from PyPI), local or mixed"
    )


class SessionInfo(BaseModel):
    id: str
    title: str
    created_at: str
    updated_at: str


class SessionCreated(_ServerEvent):
    type: Literal["session.created"] = "session.created"
    session_id: str
    session: SessionInfo


class SessionReplay(_ServerEvent):
    """Part of a batched replay (``session.resume`` with ``batch``): events of the session, in seq
    order, each exactly as it would have come in a frame of its own. A frame holds up to
    ``REPLAY_BATCH_CHARS`` characters of events (one event longer than that comes alone), and
    ``session.resumed`` follows the last. It has no seq of its own."""

    type: Literal["session.replay"] = "session.replay"
    session_id: str
    events: list[dict[str, Any]]


class SessionResumed(_ServerEvent):
    """Sent after the replay: ``last_seq`` is the newest seq the client now has."""

    type: Literal["session.resumed"] = "session.resumed"
    session_id: str
    last_seq: int
    replayed: int


class TurnCreated(_ServerEvent):
    type: Literal["turn.created"] = "turn.created"
    session_id: str
    turn_id: str
    text: str
    attachment_ids: list[str] = Field(default_factory=list)
    input: Literal["text", "speech"] = "text"


class TurnQueued(_ServerEvent):
    """The session already has a turn running; this one waits at ``position`` (1 = next)."""

    type: Literal["turn.queued"] = "turn.queued"
    session_id: str
    turn_id: str
    position: int


class TurnRouted(_ServerEvent):
    """The router's decision for the turn: which skill, how sure, and why."""

    type: Literal["turn.routed"] = "turn.routed"
    session_id: str
    turn_id: str
    skill: str
    confidence: float = Field(ge=0.0, le=1.0)
    reason: str
    overridden: bool = False
    attachment_id: str | None = Field(default=None, description="The image the turn is about, when resolved.")


class ResponseDelta(_ServerEvent):
    type: Literal["response.delta"] = "response.delta"
    session_id: str
    turn_id: str
    delta: str


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Of prompt_tokens, those the model did not compute again: their keys and values were still held
    # from the conversation's previous turn (or a start it shares with another conversation).
    cached_prompt_tokens: int = 0
    time_to_first_token_ms: float | None = None
    duration_ms: float | None = None


class ResponseDone(_ServerEvent):
    type: Literal["response.done"] = "response.done"
    session_id: str
    turn_id: str
    status: Literal["completed", "cancelled", "failed", "interrupted"]
    text: str
    skill: str | None = None
    usage: Usage = Field(default_factory=Usage)
    error: ErrorBody | None = None


class AudioStarted(_ServerEvent):
    type: Literal["audio.started"] = "audio.started"
    session_id: str
    max_seconds: float


class AudioCleared(_ServerEvent):
    type: Literal["audio.cleared"] = "audio.cleared"
    session_id: str


class TranscriptPartial(_ServerEvent):
    """What has been recognised so far while the user is still speaking."""

    type: Literal["transcript.partial"] = "transcript.partial"
    session_id: str
    text: str


class TranscriptFinal(_ServerEvent):
    """The transcript of a committed buffer or uploaded file. ``turn_id`` is set when it became a turn."""

    type: Literal["transcript.final"] = "transcript.final"
    session_id: str
    text: str
    duration_ms: float
    review: bool = False
    turn_id: str | None = None
    attachment_id: str | None = None


class ErrorCode(StrEnum):
    """Stable error codes. Clients switch on these, never on the message text."""

    unauthorized = "unauthorized"
    malformed_json = "malformed_json"
    binary_not_expected = "binary_not_expected"
    unknown_event = "unknown_event"
    invalid_event = "invalid_event"
    frame_too_large = "frame_too_large"
    session_not_found = "session_not_found"
    turn_not_found = "turn_not_found"
    turn_queue_full = "turn_queue_full"
    empty_turn = "empty_turn"
    text_too_long = "text_too_long"
    skill_unknown = "skill_unknown"
    skill_unavailable = "skill_unavailable"
    context_too_long = "context_too_long"
    generation_failed = "generation_failed"
    internal_error = "internal_error"
    # attachments (images, audio)
    attachment_not_found = "attachment_not_found"
    attachment_in_use = "attachment_in_use"
    image_unsupported_type = "image_unsupported_type"
    image_corrupt = "image_corrupt"
    image_too_large = "image_too_large"
    image_too_many_pixels = "image_too_many_pixels"
    image_decompression_bomb = "image_decompression_bomb"
    no_image = "no_image"
    # speech
    audio_not_started = "audio_not_started"
    audio_empty = "audio_empty"
    audio_silent = "audio_silent"
    audio_too_long = "audio_too_long"
    audio_too_large = "audio_too_large"
    audio_undecodable = "audio_undecodable"
    audio_format_invalid = "audio_format_invalid"


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str


class Error(_ServerEvent):
    """Something the client sent could not be done. The connection stays usable unless it is closed
    right after (``unauthorized``)."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    session_id: str | None = None
    turn_id: str | None = None


class Pong(_ServerEvent):
    type: Literal["pong"] = "pong"


ResponseDone.model_rebuild()

ServerEvent = Annotated[
    Union[
        ServerHello,
        SessionCreated,
        SessionReplay,
        SessionResumed,
        TurnCreated,
        TurnQueued,
        TurnRouted,
        ResponseDelta,
        ResponseDone,
        Error,
        Pong,
        AudioStarted,
        AudioCleared,
        TranscriptPartial,
        TranscriptFinal,
    ],
    Field(discriminator="type"),
]

_client_adapter: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)
server_adapter: TypeAdapter[ServerEvent] = TypeAdapter(ServerEvent)


class ProtocolError(Exception):
    """A client frame that cannot be turned into an event; carries the error to send back."""

    def __init__(self, code: ErrorCode, message: str, event_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.event_id = event_id

    def to_event(self) -> Error:
        return Error(code=self.code, message=self.message, event_id=self.event_id)


def parse_client_event(raw: str) -> ClientEvent:
    """Parse one text frame. Raises ``ProtocolError`` with the right code on any fault."""
    import json

    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.malformed_json, f"frame is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.invalid_event, "an event must be a JSON object")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if kind not in CLIENT_EVENT_TYPES:
        raise ProtocolError(
            ErrorCode.unknown_event,
            f"unknown event type {kind!r}; expected one of: {', '.join(CLIENT_EVENT_TYPES)}",
            event_id,
        )
    try:
        return _client_adapter.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'event'}: {err['msg']}" for err in exc.errors()
        )
        # An audio format the server does not take gets its own code, so clients can fall back.
        bad_format = kind == "audio.start" and any(err["loc"][1:2] in (("format",), ("sample_rate",)) for err in exc.errors())
        code = ErrorCode.audio_format_invalid if bad_format else ErrorCode.invalid_event
        raise ProtocolError(code, f"invalid {kind}: {problems}", event_id) from None


def dump_event(event: BaseModel) -> str:
    return event.model_dump_json(exclude_none=True)


def replay_frames(session_id: str, frames: list[str], max_chars: int = REPLAY_BATCH_CHARS) -> list[str]:
    """Logged frames grouped into ``session.replay`` frames of at most ``max_chars`` characters of
    events each (a longer event alone), spliced in as they are: nothing is parsed or serialised again."""
    head = dump_event(SessionReplay(session_id=session_id, events=[]))
    assert head.endswith("[]}"), head  # events is the last field
    head = head[:-2]
    out: list[str] = []
    chunk: list[str] = []
    size = 0
    for frame in frames:
        if chunk and size + len(frame) + 1 > max_chars:
            out.append(head + ",".join(chunk) + "]}")
            chunk, size = [], 0
        chunk.append(frame)
        size += len(frame) + 1
    if chunk:
        out.append(head + ",".join(chunk) + "]}")
    return out


def dump_at_seq(event: BaseModel) -> Callable[[int], str]:
    """``event``'s frame once the event log gives it its seq (``state.store.append_events`` calls it)."""

    def at(seq: int) -> str:
        event.seq = seq  # type: ignore[attr-defined]
        return dump_event(event)

    return at
