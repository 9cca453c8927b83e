"""What the dialogue reads of a session before each turn, on the event loop: its newest messages, as
many as a prompt can use, and every turn that named an attachment (image numbers, the image in
focus and the last question about one depend on all of those). The rest of a long conversation is
not read, so a turn costs the same at message 20 as at message 4,000 (``bench/long_session.py``)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection
from itertools import accumulate
from typing import NamedTuple

from sqlalchemy import JSON, and_, bindparam, false, func, literal_column, select, text, true, type_coerce
from sqlalchemy.orm import Session

from state.models import NAMES_ATTACHMENTS, ChatSession, Message

TAIL_ROWS = 64  # newest rows read per session at first; a window that needs more reads 4x as many
# What a message counts beyond its text: its share of the chat template (a role and an end marker,
# about four tokens), so a window of many short messages is bounded too.
PER_MESSAGE = 64
_NO_END = 2**62

_m, _s = Message.__table__, ChatSession.__table__
# attachment_ids: None for none, so most rows skip a json.loads (half of a short row's cost).
_COLUMNS = [
    *(_m.c[k] for k in ("session_id", "position", "turn_id", "role", "status", "text", "skill")),
    type_coerce(func.nullif(_m.c.attachment_ids, literal_column("'[]'")), JSON).label("attachment_ids"),
]
_IN_SESSIONS = _m.c.session_id.in_(bindparam("sids", expanding=True))
_BEFORE = _m.c.position < bindparam("before")

# The partial index's own condition as literal SQL, so SQLite uses it (a bound parameter would not
# match): a session's rows that name attachments, found without reading its text.
_NAMES_ATTACHMENTS = text(f"messages.{NAMES_ATTACHMENTS}")
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
_ATTACHED_TURNS = (
    select(*_COLUMNS, false().label("recent"))
    .where(_m.c.turn_id.in_(select(_m.c.turn_id).where(_IN_SESSIONS, _NAMES_ATTACHMENTS).scalar_subquery()), _BEFORE)
    .order_by(_m.c.session_id, _m.c.position)
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


def context(db: Session, *, session_id: str, chars: int | None = None, before: int | None = None) -> list[ContextRow]:
    """``contexts`` of one session."""
    return contexts(db, session_ids=[session_id], chars=chars, before=before).get(session_id, [])


def contexts(
    db: Session, *, session_ids: Collection[str], chars: int | None = None, before: int | None = None
) -> dict[str, list[ContextRow]]:
    """Each session's messages (those at positions before ``before``, if given) in order, as
    ``ContextRow``s; a session with none is absent. With ``chars``, the rows are
    the newest messages while those after each measure less than ``chars`` (their text and
    ``PER_MESSAGE`` each; so at least the newest), marked ``recent``, preceded by both messages of
    every older turn that named an attachment (``recent`` false). Without it, all of them, each
    ``recent``."""
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
        older: dict[str, list[ContextRow]] = {}
        for row in conn.execute(_ATTACHED_TURNS, {**params, "sids": partial}):
            older.setdefault(row[0], []).append(ContextRow._make(row))
        for sid, rows_ in older.items():
            first = out[sid][0].position
            out[sid][:0] = [r for r in rows_ if r.position < first]
    return out


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
