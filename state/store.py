"""Keyword-only store functions over a SQLAlchemy ``Session``. Callers own the transaction."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Row, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from state.models import DEFAULT_TITLE, Attachment, ChatSession, Event, Message, Token, User, new_id, utcnow

UNFINISHED = ("received", "queued", "routed", "running")


# ----------------------------------------------------------------------------- users and tokens


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_or_create_user(db: Session, *, name: str) -> User:
    user = db.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name)
        db.add(user)
        db.flush()
    return user


def count_users(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(User)) or 0


def create_token(db: Session, *, user: User, label: str = "") -> str:
    """Create a bearer token for ``user``; returns the secret, of which only the hash is kept."""
    secret = "ast_" + secrets.token_urlsafe(32)
    db.add(Token(user_id=user.id, token_hash=hash_token(secret), label=label))
    db.flush()
    return secret


def user_for_token(db: Session, *, token: str) -> User | None:
    row = db.scalar(select(Token).where(Token.token_hash == hash_token(token), Token.revoked.is_(False)))
    return db.get(User, row.user_id) if row else None


def revoke_tokens(db: Session, *, user: User) -> int:
    res = db.execute(update(Token).where(Token.user_id == user.id).values(revoked=True))
    return res.rowcount or 0


# ----------------------------------------------------------------------------- sessions


def create_session(db: Session, *, user_id: str, title: str | None = None) -> ChatSession:
    sess = ChatSession(user_id=user_id, title=title or DEFAULT_TITLE)
    db.add(sess)
    db.flush()
    return sess


def get_session(db: Session, *, session_id: str, user_id: str) -> ChatSession | None:
    """The session if it exists, is not deleted and belongs to ``user_id``; otherwise None (no leak of which)."""
    sess = db.get(ChatSession, session_id)
    return sess if sess is not None and sess.user_id == user_id and not sess.deleted else None


def session_heads(db: Session, *, session_ids: Collection[str]) -> dict[str, Row]:
    """The ``id``, ``user_id`` and ``title`` of each of these sessions that exists, in one prepared
    Core read (the caller checks the owner): a burst of turns is admitted with one read for all."""
    rows = db.connection().execute(_SESSION_HEADS, {"sids": list(session_ids)}).all()
    return {row.id: row for row in rows}


def list_sessions(db: Session, *, user_id: str, limit: int = 100, offset: int = 0) -> Sequence[ChatSession]:
    stmt = (
        select(ChatSession)
        .where(ChatSession.user_id == user_id, ChatSession.deleted.is_(False))
        .order_by(ChatSession.updated_at.desc(), ChatSession.id)
        .limit(limit)
        .offset(offset)
    )
    return db.scalars(stmt).all()


def rename_session(db: Session, *, session: ChatSession, title: str) -> None:
    session.title = title
    session.updated_at = utcnow()


def delete_session(db: Session, *, session: ChatSession) -> None:
    """Delete the session and all its rows in this transaction (the server hides it with
    ``mark_deleted`` and removes the rest with ``purge_session``, a little at a time)."""
    mark_deleted(db, session=session)
    while purge_session(db, session_id=session.id, limit=1 << 62):
        pass


def mark_deleted(db: Session, *, session: ChatSession) -> None:
    """Hide the session from every lookup (``get_session``, ``session_heads``, ``list_sessions``) and
    delete its attachments (their files: ``release_blobs``); ``purge_session`` removes the rest."""
    session.deleted = True
    db.execute(delete(Attachment).where(Attachment.session_id == session.id))


def deleted_sessions(db: Session) -> list[str]:
    """Sessions marked deleted whose rows are not all removed yet (a purge that a shutdown cut off)."""
    return list(db.scalars(select(ChatSession.id).where(ChatSession.deleted.is_(True))))


def purge_session(db: Session, *, session_id: str, limit: int) -> int:
    """Delete up to ``limit`` events, then messages, of a session marked deleted; once it has none,
    the session itself. Returns the rows deleted: 0 when the session is gone. A long session's rows
    go in many short transactions, not one that would hold the database, and the event loop that
    writes every stream to it (up to 200 ms for 80,000 events, ``bench/delete_session.py``)."""
    conn = db.connection()
    for stmt in (_PURGE_EVENTS, _PURGE_MESSAGES):
        n = conn.execute(stmt, {"sid": session_id, "n": limit}).rowcount
        if n:
            return n
    return conn.execute(delete(_sessions_t).where(_sessions_t.c.id == session_id, _sessions_t.c.deleted.is_(True))).rowcount


# ----------------------------------------------------------------------------- messages


@dataclass
class NewTurn:
    """A user message and its (empty) assistant message, which carries the turn's status, to store.
    ``position`` is the user message's, when the caller has just read the session's messages (else
    the next free one is looked up); ``reply`` sets more of the reply's columns (a turn routed as it
    is admitted)."""

    session_id: str
    turn_id: str
    text: str
    attachment_ids: list[str]
    status: str
    skill_override: str | None
    input_kind: str = "text"
    position: int | None = None
    reply: dict[str, object] | None = None


def add_turns(db: Session, *, turns: Sequence[NewTurn], titles: Mapping[str, str]) -> list[tuple[str, int]]:
    """Store many turns, in order (several may share a session), with one insert for all their
    messages and one update for all their sessions; a session still called "New chat" is named after
    its first turn with text. ``titles`` holds each session's title as read. Returns (reply id, user
    message position) per turn. Each attachment a user message names for the first time in its
    session gets that position (``Attachment.first_position``: the session's image numbers). Core
    statements: turns are admitted on the event loop, and a burst of them waits on this."""
    if not turns:
        return []
    conn = db.connection()
    next_position: dict[str, int] = {}
    unknown = []  # sessions whose first turn here needs the next free position looked up
    for turn in turns:
        if turn.session_id not in next_position:
            next_position[turn.session_id] = -1 if turn.position is None else turn.position
            if turn.position is None:
                unknown.append(turn.session_id)
    if unknown:
        found = dict(conn.execute(_LAST_POSITIONS, {"sids": unknown}).all())  # type: ignore[arg-type]
        for sid in unknown:
            last = found.get(sid)
            next_position[sid] = (last if last is not None else -1) + 1
    titles = dict(titles)
    named: dict[str, str] = {}
    rows, out, first_named = [], [], []
    for turn in turns:
        position = turn.position if turn.position is not None else next_position[turn.session_id]
        first_named += [{"aid": aid, "v_position": position, "v_index": k} for k, aid in enumerate(turn.attachment_ids)]
        next_position[turn.session_id] = position + 2
        reply_id = new_id()
        common = {"session_id": turn.session_id, "turn_id": turn.turn_id}  # the other columns take their defaults
        rows.append({**common, "id": new_id(), "position": position, "role": "user", "text": turn.text,
                     "input": turn.input_kind, "status": "completed", "skill_override": None,
                     "attachment_ids": list(turn.attachment_ids)})  # fmt: skip
        rows.append({**common, "id": reply_id, "position": position + 1, "role": "assistant", "text": "",
                     "input": "text", "status": turn.status, "skill_override": turn.skill_override,
                     "attachment_ids": [], **(turn.reply or {})})  # fmt: skip
        if titles[turn.session_id] == DEFAULT_TITLE and turn.text.strip():
            titles[turn.session_id] = named[turn.session_id] = title_from(turn.text)
        out.append((reply_id, position))
    # One executemany needs the same keys in each row (the reply-only ones are nullable).
    keys = {key for row in rows for key in row}
    conn.execute(insert(_messages_t), [{key: row.get(key) for key in keys} for row in rows])
    now = utcnow()
    conn.execute(_TOUCH, [{"sid": sid, "v_updated": now} for sid in dict.fromkeys(t.session_id for t in turns)])
    if named:
        conn.execute(_NAME, [{"sid": sid, "v_title": title} for sid, title in named.items()])
    if first_named:  # in order: an id named twice keeps its first place
        conn.execute(_FIRST_NAMED, first_named)
    return out


def history(db: Session, *, session_id: str, before: int | None = None, limit: int | None = None) -> Sequence[Row]:
    """Messages in order, as read-only rows with ``Message``'s columns as attributes: all of them,
    or the newest ``limit`` before position ``before`` (a page of a long conversation)."""
    stmt = select(_messages_t).where(_messages_t.c.session_id == session_id)
    if before is not None:
        stmt = stmt.where(_messages_t.c.position < before)
    if limit is None:
        return db.connection().execute(stmt.order_by(_messages_t.c.position)).all()
    return db.connection().execute(stmt.order_by(_messages_t.c.position.desc()).limit(limit)).all()[::-1]


def update_reply(db: Session, *, message_id: str, **fields: object) -> None:
    # A Core statement: no caller holds the row as an object in the same transaction.
    db.connection().execute(update(_messages_t).where(_messages_t.c.id == message_id).values(**fields))


def unfinished_replies(db: Session) -> Sequence[Message]:
    return db.scalars(select(Message).where(Message.role == "assistant", Message.status.in_(UNFINISHED))).all()


# ----------------------------------------------------------------------------- event log


# Core statements for the streaming hot path (built once; bypass the ORM's per-call work).
_sessions_t, _events_t, _messages_t = ChatSession.__table__, Event.__table__, Message.__table__
_attachments_t = Attachment.__table__
_FIRST_NAMED = (
    update(_attachments_t)
    .where(_attachments_t.c.id == bindparam("aid"), _attachments_t.c.first_position.is_(None))
    .values(first_position=bindparam("v_position"), first_index=bindparam("v_index"))
)
_BUMP_SEQ = (
    update(_sessions_t)
    .where(_sessions_t.c.id == bindparam("sid"))
    .values(last_seq=_sessions_t.c.last_seq + bindparam("n"))
    .returning(_sessions_t.c.last_seq)
)
_ADD_SEQ = update(_sessions_t).where(_sessions_t.c.id == bindparam("sid")).values(last_seq=_sessions_t.c.last_seq + bindparam("n"))
_LAST_SEQS = select(_sessions_t.c.id, _sessions_t.c.last_seq).where(_sessions_t.c.id.in_(bindparam("sids", expanding=True)))
_LAST_POSITIONS = (
    select(_messages_t.c.session_id, func.max(_messages_t.c.position))
    .where(_messages_t.c.session_id.in_(bindparam("sids", expanding=True)))
    .group_by(_messages_t.c.session_id)
)
FINISH_FIELDS = ("status", "text", "finished_at", "error_code", "prompt_tokens", "completion_tokens")
_FINISH = (
    update(_messages_t).where(_messages_t.c.id == bindparam("mid")).values({k: bindparam(f"v_{k}") for k in FINISH_FIELDS})
)
_NAME_UNTITLED = (
    update(_sessions_t)
    .where(
        _sessions_t.c.title == DEFAULT_TITLE,
        _sessions_t.c.id == select(_messages_t.c.session_id).where(_messages_t.c.id == bindparam("mid")).scalar_subquery(),
    )
    .values(title=bindparam("v_title"))
)
_TOUCH = update(_sessions_t).where(_sessions_t.c.id == bindparam("sid")).values(updated_at=bindparam("v_updated"))
_NAME = (
    update(_sessions_t)
    .where(_sessions_t.c.id == bindparam("sid"), _sessions_t.c.title == DEFAULT_TITLE)
    .values(title=bindparam("v_title"))
)
_SESSION_HEADS = select(_sessions_t.c.id, _sessions_t.c.user_id, _sessions_t.c.title).where(
    _sessions_t.c.id.in_(bindparam("sids", expanding=True)), _sessions_t.c.deleted.is_(False)
)
# A deleted session's oldest rows, through the (session_id, seq) and (session_id, position) indexes.
_PURGE_EVENTS = delete(_events_t).where(
    _events_t.c.session_id == bindparam("sid"),
    _events_t.c.seq.in_(select(_events_t.c.seq).where(_events_t.c.session_id == bindparam("sid"))
                        .order_by(_events_t.c.seq).limit(bindparam("n")).scalar_subquery()),
)  # fmt: skip
_PURGE_MESSAGES = delete(_messages_t).where(
    _messages_t.c.id.in_(select(_messages_t.c.id).where(_messages_t.c.session_id == bindparam("sid"))
                         .order_by(_messages_t.c.position).limit(bindparam("n")).scalar_subquery()),
)  # fmt: skip
_SET_FIRST_TOKEN = update(_messages_t).where(_messages_t.c.id == bindparam("mid")).values(first_token_at=bindparam("v_at"))
_EVENTS_AFTER = (
    select(_events_t.c.seq, _events_t.c.type, _events_t.c.payload)
    .where(_events_t.c.session_id == bindparam("sid"), _events_t.c.seq > bindparam("after"))
    .order_by(_events_t.c.seq)
)
_SET_TEXT = update(_messages_t).where(_messages_t.c.id == bindparam("mid")).values(text=bindparam("body"))


def append_event(db: Session, *, session_id: str, event_type: str, payload_for_seq) -> int:  # noqa: ANN001
    """Give the next seq of ``session_id`` to an event; ``payload_for_seq(seq)`` returns its JSON."""
    return append_events(db, events=[(session_id, event_type, payload_for_seq)])[0][0]


def append_events(
    db: Session,
    *,
    events: list[tuple[str, str, Callable[[int], str]]],
    skip_missing: bool = False,
    unlogged: Collection[str] = (),
) -> list[tuple[int, str]]:
    """Log many events at once (group commit): ``(session_id, event_type, payload_for_seq)`` each,
    in order; one seq update per session and one multi-row insert. Returns (seq, payload) each.
    Events of a type in ``unlogged`` get their seq but no row. A session that does not exist
    raises LookupError; with ``skip_missing`` its events are not logged and their entries are None
    (the others' are unaffected)."""
    db.flush()  # rows the ORM still holds (a new session) must exist before their events
    conn = db.connection()
    counts: dict[str, int] = {}
    for session_id, _, _ in events:
        counts[session_id] = counts.get(session_id, 0) + 1
    next_seq: dict[str, int] = {}
    if len(counts) == 1:
        (session_id, n), = counts.items()
        last = conn.execute(_BUMP_SEQ, {"sid": session_id, "n": n}).scalar()
        lasts = {} if last is None else {session_id: last}
    else:  # one executemany and one read for all the sessions, not a statement each
        conn.execute(_ADD_SEQ, [{"sid": sid, "n": n} for sid, n in counts.items()])
        lasts = dict(conn.execute(_LAST_SEQS, {"sids": list(counts)}).all())  # type: ignore[arg-type]
    for session_id, n in counts.items():
        if session_id not in lasts:
            if not skip_missing:
                raise LookupError(f"session {session_id} does not exist")
            continue
        next_seq[session_id] = lasts[session_id] - n + 1
    rows, logged = [], []
    now = utcnow()
    for session_id, event_type, payload_for_seq in events:
        if session_id not in next_seq:
            logged.append(None)
            continue
        seq = next_seq[session_id]
        next_seq[session_id] = seq + 1
        logged.append((seq, payload_for_seq(seq)))
        if event_type not in unlogged:
            rows.append({"session_id": session_id, "seq": seq, "type": event_type, "payload": logged[-1][1], "created_at": now})
    if rows:
        conn.execute(insert(_events_t), rows)
    return logged  # type: ignore[return-value]


def update_reply_texts(db: Session, *, texts: dict[str, str]) -> None:
    """Set the text of many replies in one executemany."""
    if texts:
        db.connection().execute(_SET_TEXT, [{"mid": mid, "body": text} for mid, text in texts.items()])


def set_first_token_times(db: Session, *, times: dict[str, datetime]) -> None:
    """Set when many replies' first tokens came, in one executemany."""
    if times:
        db.connection().execute(_SET_FIRST_TOKEN, [{"mid": mid, "v_at": at} for mid, at in times.items()])


def finish_replies(db: Session, *, rows: dict[str, dict[str, object]]) -> None:
    """Store the final columns (``FINISH_FIELDS``, each row has all of them) of many replies in one
    executemany. A session still called "New chat" (its first turn had images and no text) is named
    after its first completed reply, the image's caption."""
    if not rows:
        return
    conn = db.connection()
    conn.execute(_FINISH, [{"mid": mid, **{f"v_{k}": row[k] for k in FINISH_FIELDS}} for mid, row in rows.items()])
    named = [
        {"mid": mid, "v_title": title_from(str(row["text"]), capitalise=True)}
        for mid, row in rows.items()
        if row["status"] == "completed" and str(row["text"]).strip()
    ]
    if named:
        conn.execute(_NAME_UNTITLED, named)


def title_from(text: str, *, capitalise: bool = False) -> str:
    """A session title from a message: its words on one line, at most 60 characters."""
    title = " ".join(text.split())[:60]
    return title[:1].upper() + title[1:] if capitalise else title


def events_after(db: Session, *, session_id: str, after_seq: int) -> Sequence[Row]:
    """The session's logged events after ``after_seq``, in order, as rows of ``seq``, ``type`` and
    ``payload``: what a resume replays, with the deltas of the reply streaming now, which are not
    logged (``assistant.stream_writer``). An ended reply's ``response.done`` carries its whole text."""
    return db.connection().execute(_EVENTS_AFTER, {"sid": session_id, "after": after_seq}).all()


def as_iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
