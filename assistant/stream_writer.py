"""Group commit for streamed replies: every ``response.delta`` and every closing ``response.done``
queued during one turn of the event loop gets its seq, and its reply row updated, in one
transaction, then fanned out. A ``response.done`` is logged; a delta is not (its reply row holds the
text so far): the deltas of the reply streaming in a session are kept here, in memory, for a client
that resumes mid-stream, and dropped when the reply ends, whose ``response.done`` carries the whole
text. Logging every delta made them most of the database (1,000 turns: 40,000 of 43,002 events),
rows no resume read once their reply had ended.

One transaction per frame per session was the web process's ceiling (about 2 ms of SQLAlchemy and
SQLite work each); one per loop turn for all sessions costs a fraction of that per frame. Each
stream awaits its write, so a frame is never sent before it is stored, a failed write fails the
turn, and text arriving meanwhile joins the stream's next frame. A burst of turns that finish
together (64 sessions answered in the same step) shares one commit the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from assistant import protocol as p
from state import store


UNLOGGED = frozenset({"response.delta"})  # numbered and sent, not logged


@dataclass
class _Pending:
    event: BaseModel  # p.ResponseDelta | p.ResponseDone
    reply_id: str
    text: str  # the reply's whole text so far
    first_token_at: datetime | None  # set on a turn's first frame
    finished: dict[str, object] | None  # the reply's final columns, with a response.done
    done: asyncio.Future


class StreamWriter:
    def __init__(self, sessions: sessionmaker[Session], fan_out: Callable[[str, str], None]) -> None:
        self._sessions = sessions
        self._fan_out = fan_out
        self._pending: list[_Pending] = []
        self._scheduled = False
        self.batches = 0  # transactions written (observability)
        # session -> (turn, [(seq, frame)]): the deltas of the reply streaming there
        self._streaming: dict[str, tuple[str, list[tuple[int, str]]]] = {}

    def streaming_after(self, session_id: str, after_seq: int) -> list[tuple[int, str]]:
        """The deltas after ``after_seq`` of the reply streaming in this session, as (seq, frame),
        in order (kept as each batch is stored, so a resume never falls between)."""
        entry = self._streaming.get(session_id)
        if entry is None:
            return []
        frames = entry[1]
        return frames if not frames or frames[0][0] > after_seq else [f for f in frames if f[0] > after_seq]

    def ended(self, session_id: str, turn_id: str) -> None:
        """``turn_id``'s reply ended without ``finish`` (its task was cancelled: the session deleted,
        or the server stopping): drop its deltas."""
        entry = self._streaming.get(session_id)
        if entry is not None and entry[0] == turn_id:
            del self._streaming[session_id]

    def write(
        self, event: p.ResponseDelta, *, reply_id: str, text: str, first_token_at: datetime | None = None
    ) -> asyncio.Future:
        """Queue a delta; the future resolves once it is stored and sent."""
        return self._queue(_Pending(event, reply_id, text, first_token_at, None, _future()))

    def finish(self, event: p.ResponseDone, *, reply_id: str, fields: dict[str, object]) -> asyncio.Future:
        """Queue a turn's ``response.done`` with its reply's final columns (``store.FINISH_FIELDS``)."""
        return self._queue(_Pending(event, reply_id, "", None, fields, _future()))

    def _queue(self, item: _Pending) -> asyncio.Future:
        self._pending.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return item.done

    def flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            with self._sessions.begin() as db:
                logged = store.append_events(
                    db,
                    events=[(it.event.session_id, it.event.type, p.dump_at_seq(it.event)) for it in batch],  # type: ignore[attr-defined]
                    skip_missing=True,
                    unlogged=UNLOGGED,
                )
                store.update_reply_texts(db, texts={it.reply_id: it.text for it in batch if it.finished is None})
                store.finish_replies(db, rows={it.reply_id: it.finished for it in batch if it.finished is not None})
                store.set_first_token_times(
                    db, times={it.reply_id: it.first_token_at for it in batch if it.first_token_at is not None}
                )
        except Exception as exc:  # noqa: BLE001 - each waiting stream fails its own turn
            for it in batch:
                if not it.done.done():
                    it.done.set_exception(exc)
            return
        self.batches += 1
        for it, entry in zip(batch, logged):
            sid, turn_id = it.event.session_id, it.event.turn_id  # type: ignore[attr-defined]
            streaming = self._streaming.get(sid)
            if entry is None or (it.finished is not None and streaming is not None and streaming[0] == turn_id):
                self._streaming.pop(sid, None)
            elif it.finished is None and not it.done.cancelled():  # cancelled: its turn was stopped (``ended``)
                if streaming is None or streaming[0] != turn_id:  # one reply streams at a time
                    streaming = self._streaming[sid] = (turn_id, [])
                streaming[1].append(entry)
            if entry is None:  # its session was deleted meanwhile; the others are stored
                if not it.done.done():
                    it.done.set_exception(LookupError(f"session {it.event.session_id} was deleted"))  # type: ignore[attr-defined]
                continue
            self._fan_out(it.event.session_id, entry[1])  # type: ignore[attr-defined]
            if not it.done.done():
                it.done.set_result(None)


def _future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()
