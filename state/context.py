"""What the dialogue reads of a session before each turn, on the event loop: its newest messages, as
many as a prompt can use, and of the older turns only those the images need: the newest that named
an attachment (the image in focus) and the newest that VQA answered (the last question asked about
an image). Image numbers come with the attachments (``Attachment.first_position``). The rest of a
long conversation is not read, so a turn costs about the same at message 20 as at message 4,000,
whether or not its turns name images (``bench/long_session.py``)."""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Collection
from itertools import accumulate
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON, Integer, String, and_, bindparam, column, false, func, literal_column, select, text, true, type_coerce,
)
from sqlalchemy.orm import Session

from state.models import ANSWERED_BY_VQA, NAMES_ATTACHMENTS, ChatSession, Message

TAIL_ROWS = 64  # newest rows read per session at first; a window that needs more reads 4x as many
# What a message counts beyond its text: its share of the chat template (a role and an end marker,
# about four tokens), so a window of many short messages is bounded too.
PER_MESSAGE = 64
VQA_PAGE = 4  # older VQA turns read at a time, newest first, until one asked a question of its own
_NO_END = 2**62

_m, _s = Message.__table__, ChatSession.__table__
# attachment_ids: None for none, so most rows skip a json.loads (half of a short row's cost).
_COLUMNS = [
    *(_m.c[k] for k in ("session_id", "position", "turn_id", "role", "status", "text", "skill")),
    type_coerce(func.nullif(_m.c.attachment_ids, literal_column("'[]'")), JSON).label("attachment_ids"),
]
_IN_SESSIONS = _m.c.session_id.in_(bindparam("sids", expanding=True))
_BEFORE = _m.c.position < bindparam("before")

# The partial indexes' own conditions as literal SQL, so SQLite uses them (a bound parameter would
# not match): a session's rows that name attachments, and its VQA replies, found without reading the rest.
_NAMES_ATTACHMENTS = text(f"messages.{NAMES_ATTACHMENTS}")
_ANSWERED_BY_VQA = text(ANSWERED_BY_VQA)
_ALL = select(*_COLUMNS, true().label("recent")).where(_IN_SESSIONS, _BEFORE).order_by(_m.c.session_id, _m.c.position)
# Each session's first and last position before ``before``: two index seeks a session (min and max
# of a correlated subquery are; a GROUP BY scans every entry of a long session's index).
_first_last = [
    select(fn(_m.c.position)).where(_m.c.session_id == _s.c.id, _BEFORE).scalar_subquery().label(name)
    for fn, name in ((func.min, "low"), (func.max, "top"))
]
_bounds = select(_s.c.id.label("sid"), *_first_last).where(_s.c.id.in_(bindparam("sids", expanding=True))).subquery()
_TAIL = (
    select(*_COLUMNS, true().label("recent"), _bounds.c.low)
    .join_from(_bounds, _m, and_(_m.c.session_id == _bounds.c.sid, _m.c.position > _bounds.c.top - bindparam("rows"),
                                 _m.c.position <= _bounds.c.top))  # fmt: skip
    .order_by(_bounds.c.sid, _m.c.position)  # the order of the IN list and the index: no sort (by sessions.id)
)
# Per session (``bounds``: its id and where its window starts), the newest older row that named an
# attachment, and the newest older reply VQA gave: one index seek each, in one statement for a burst.
_VQA_DONE = and_(_ANSWERED_BY_VQA, _m.c.status == "completed")


def _pairs(name: str, first: str, second: str, type_: Any) -> Any:
    """A table of (session id, number) pairs from one JSON parameter ``name``: one statement text
    for any number of sessions, compiled once (a VALUES list is compiled again at each call)."""
    sql = f"SELECT json_extract(value, '$[0]') AS {first}, json_extract(value, '$[1]') AS {second} FROM json_each(:{name})"
    return text(sql).columns(column(first, String), column(second, type_)).cte(name)


def _newest(bounds: Any, condition: Any) -> Any:
    return (
        select(_m.c.position)
        .where(_m.c.session_id == bounds.c.sid, condition, _m.c.position < bounds.c.first)
        .order_by(_m.c.position.desc())
        .limit(1)
        .scalar_subquery()
    )


_BOUNDS = _pairs("bounds", "sid", "first", Integer)
_HEADS = select(_BOUNDS.c.sid, _newest(_BOUNDS, _NAMES_ATTACHMENTS), _newest(_BOUNDS, _VQA_DONE))
_KEYS = _pairs("keys", "sid", "pos", Integer)
_AT = select(*_COLUMNS, false().label("recent")).join_from(
    _KEYS, _m, and_(_m.c.session_id == _KEYS.c.sid, _m.c.position == _KEYS.c.pos)
)  # rows by (session, position): an index seek each


# Of one session, VQA's replies before ``first``, newest first (``n`` of them), for going further back.
_ANSWERED = (
    select(_m.c.position)
    .where(_m.c.session_id == bindparam("sid"), _m.c.position < bindparam("first"), _VQA_DONE)
    .order_by(_m.c.position.desc())
    .limit(bindparam("n"))
)


class ContextRow(NamedTuple):
    """A message as a turn reads it (a plain tuple: a SQLAlchemy Row's attributes cost ~10x to read,
    and routing reads several of every message in the window)."""

    session_id: str
    position: int
    turn_id: str
    role: str
    status: str
    text: str
    skill: str | None
    attachment_ids: list[str] | None  # None: none
    recent: bool  # in the window (else an older turn read for the images it named)


_FIELDS = len(ContextRow._fields)


Asked = Callable[[str], bool]  # whether a user message's text asked a question of its own


def context(
    db: Session, *, session_id: str, chars: int | None = None, before: int | None = None, asked: Asked | None = None
) -> list[ContextRow]:
    """``contexts`` of one session."""
    return contexts(db, session_ids=[session_id], chars=chars, before=before, asked=asked).get(session_id, [])


def contexts(
    db: Session, *, session_ids: Collection[str], chars: int | None = None, before: int | None = None,
    asked: Asked | None = None,
) -> dict[str, list[ContextRow]]:
    """Each session's messages (those at positions before ``before``, if given) in order, as
    ``ContextRow``s; a session with none is absent. With ``chars``, the rows are the newest messages
    while those after each measure less than ``chars`` (their text and ``PER_MESSAGE`` each; so at
    least the newest), marked ``recent``, preceded (``recent`` false) by both messages of the newest
    older turn that named an attachment and of the newest older turns that VQA answered: back to the
    newest whose user message ``asked`` (just the newest without ``asked``). Without ``chars``, all of
    them, each ``recent``."""
    conn = db.connection()
    params = {"before": _NO_END if before is None else before}
    out: dict[str, list[ContextRow]] = {}
    if chars is None:
        for row in conn.execute(_ALL, {**params, "sids": list(session_ids)}):
            out.setdefault(row[0], []).append(ContextRow._make(row))
        return out
    want, rows, partial = list(session_ids), TAIL_ROWS, []
    while want:
        tails: dict[str, list[ContextRow]] = {}
        lows: dict[str, int] = {}
        for row in conn.execute(_TAIL, {**params, "sids": want, "rows": rows}):
            tails.setdefault(row[0], []).append(ContextRow._make(row[:_FIELDS]))
            lows[row[0]] = row[_FIELDS]
        want, rows = [], rows * 4
        for sid, tail in tails.items():
            start = _window_start(tail, chars, older=tail[0].position > lows[sid])
            if start is None:  # all of these fit, and there are older messages
                want.append(sid)
            else:
                out[sid] = tail[start:]
                if out[sid][0].position > lows[sid]:
                    partial.append(sid)
    if partial:
        for sid, rows_ in _older(conn, {sid: out[sid][0].position for sid in partial}, asked).items():
            out[sid][:0] = rows_
    return out


def _older(conn: Any, firsts: dict[str, int], asked: Asked | None) -> dict[str, list[ContextRow]]:
    """For each session whose window starts at ``firsts[sid]``, the older turns the images need (see
    ``contexts``): a few index seeks a session, however many of its turns named images."""
    heads = conn.execute(_HEADS, {"bounds": json.dumps(list(firsts.items()))}).all()
    found = _rows_at(conn, [(sid, p + k) for sid, *ps in heads for p in ps if p is not None for k in (-1, 0, 1)])
    out: dict[str, list[ContextRow]] = {}
    for sid, named, answered in heads:
        rows = _turn(found, sid, named)
        if answered is not None:
            turn = _turn(found, sid, answered)
            rows.update(turn)
            if asked is not None and not _asks(turn, asked):
                rows.update(_asked_before(conn, sid, answered, asked))
        out[sid] = [rows[k] for k in sorted(rows) if k < firsts[sid]]  # a window may start at a turn's reply
    return out


def _asked_before(conn: Any, sid: str, bound: int, asked: Asked) -> dict[int, ContextRow]:
    """VQA's turns before position ``bound``, newest first, back to one whose user message ``asked``
    (follow-ups repeat the question before them, so that is seldom more than one page)."""
    rows: dict[int, ContextRow] = {}
    while page := conn.execute(_ANSWERED, {"sid": sid, "first": bound, "n": VQA_PAGE}).scalars().all():
        found = _rows_at(conn, [(sid, p + k) for p in page for k in (-1, 0)])
        for p in page:
            turn = _turn(found, sid, p)
            rows.update(turn)
            if _asks(turn, asked):
                return rows
        bound = page[-1]
    return rows


def _asks(turn: dict[int, ContextRow], asked: Asked) -> bool:
    return any(r.role == "user" and asked(r.text) for r in turn.values())


def _rows_at(conn: Any, keys: list[tuple[str, int]]) -> dict[tuple[str, int], ContextRow]:
    """The rows at these (session, position)s: an index seek each."""
    if not keys:
        return {}
    return {(r.session_id, r.position): r for r in map(ContextRow._make, conn.execute(_AT, {"keys": json.dumps(keys)}).all())}


def _turn(found: dict[tuple[str, int], ContextRow], sid: str, position: int | None) -> dict[int, ContextRow]:
    """The rows of ``found`` in the turn of the row at ``position`` (its user message and reply are
    next to each other)."""
    row = found.get((sid, position)) if position is not None else None
    if row is None:
        return {}
    near = (found.get((sid, position + k)) for k in (-1, 0, 1))
    return {r.position: r for r in near if r is not None and r.turn_id == row.turn_id}


def _window_start(tail: list[ContextRow], chars: int, *, older: bool) -> int | None:
    """Where the window starts in ``tail`` (the newest rows of a session, in order): at the first
    row whose newer rows measure less than ``chars`` (``PER_MESSAGE`` each plus their text). None
    when all of them do and there are ``older`` rows, which might too."""
    # measured[j]: the newest j + 1 rows; row j (from the newest) is in while measured[j - 1] < chars
    measured = list(accumulate([len(r.text) + PER_MESSAGE for r in reversed(tail)]))
    k = bisect_left(measured, chars)  # the oldest row in: measured only increases
    if k == len(measured):
        return None if older else 0
    return len(tail) - 1 - k
