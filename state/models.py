"""SQLAlchemy 2.0 models: a row per user, token, session, message, attachment and logged event."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint, false, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


DEFAULT_TITLE = "New chat"  # until the first turn names the session
# A message that names attachments: the condition of the partial index ix_messages_attached.
NAMES_ATTACHMENTS = "attachment_ids != '[]'"
# A reply that visual question answering gave: the condition of the partial index ix_messages_vqa
# (the last question asked about an image, found without reading a long session's other turns).
ANSWERED_BY_VQA = "role = 'assistant' AND skill = 'vqa'"


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Token(Base):
    """A bearer token; only its sha256 is stored."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class ChatSession(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200), default=DEFAULT_TITLE)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Highest seq handed out in this session's event log.
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    # Deleted: no lookup finds it; its rows are removed 500 at a time (store.purge_session).
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    messages: Mapped[list[Message]] = relationship(
        back_populates="session", cascade="all, delete-orphan", passive_deletes=True, order_by="Message.position"
    )


class Message(Base):
    """One message. A turn is a user message and an assistant message sharing ``turn_id``; the
    assistant message carries the turn's lifecycle status, routing decision and timings."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_session_position", "session_id", "position"),
        # The rows that name attachments, found without reading a long session's text (state.context).
        Index("ix_messages_attached", "session_id", "position", sqlite_where=text(NAMES_ATTACHMENTS)),
        Index("ix_messages_vqa", "session_id", "position", sqlite_where=text(ANSWERED_BY_VQA)),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    turn_id: Mapped[str] = mapped_column(String(32), index=True)
    position: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))  # user | assistant
    text: Mapped[str] = mapped_column(Text, default="")
    # How the user gave the text: typed ("text") or spoken and transcribed ("speech").
    input: Mapped[str] = mapped_column(String(16), default="text", server_default="text")
    status: Mapped[str] = mapped_column(String(16))
    skill: Mapped[str | None] = mapped_column(String(32), nullable=True)
    route_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    route_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    skill_override: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    first_token_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attachment_ids: Mapped[list[str]] = mapped_column(JSON, default=list)

    session: Mapped[ChatSession] = relationship(back_populates="messages")


class Attachment(Base):
    """An uploaded file (image, audio), stored once by sha256 and referenced from turns by id."""

    __tablename__ = "attachments"
    __table_args__ = (UniqueConstraint("session_id", "sha256", name="uq_attachments_session_sha256"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # image | audio
    mime_type: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Where a user message of the session first named it (position, index among that message's ids),
    # None until one does: the session's images are numbered in that order ("image 2").
    first_position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_index: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Event(Base):
    """The per-session log of server events, in ``seq`` order, replayed to resuming clients. Streamed
    ``response.delta``s get their seq but no row: while their reply streams they are kept in memory
    (``assistant.stream_writer``), and its ``response.done`` carries the whole text."""

    __tablename__ = "events"

    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
