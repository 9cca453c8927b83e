"""Group commit for streamed text: every ``response.delta`` queued during one turn of the event loop
is logged (with its seq) and its reply's text updated in one transaction, then fanned out.

One transaction per frame per session was the web process's ceiling (about 2 ms of SQLAlchemy and
SQLite work each); one per loop turn for all sessions costs a fraction of that per frame. Each
stream awaits its write, so a frame is never sent before it is stored, a failed write fails the
turn, and text arriving meanwhile joins the stream's next frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker

from assistant import protocol as p
from state import store


@dataclass
class _Pending:
    event: p.ResponseDelta
    reply_id: str
    text: str  # the reply's whole text so far
    first_token_at: datetime | None  # set on a turn's first frame
    done: asyncio.Future


class DeltaWriter:
    def __init__(self, sessions: sessionmaker[Session], fan_out: Callable[[str, str], None]) -> None:
        self._sessions = sessions
        self._fan_out = fan_out
        self._pending: list[_Pending] = []
        self._scheduled = False
        self.batches = 0  # transactions written (observability)

    def write(
        self, event: p.ResponseDelta, *, reply_id: str, text: str, first_token_at: datetime | None = None
    ) -> asyncio.Future:
        """Queue ``event``; the future resolves once it is stored and sent."""
        loop = asyncio.get_running_loop()
        item = _Pending(event, reply_id, text, first_token_at, loop.create_future())
        self._pending.append(item)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)
        return item.done

    def flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return

        def payload(event: p.ResponseDelta) -> Callable[[int], str]:
            def at(seq: int) -> str:
                event.seq = seq
                return p.dump_event(event)

            return at

        try:
            with self._sessions.begin() as db:
                logged = store.append_events(
                    db, events=[(it.event.session_id, it.event.type, payload(it.event)) for it in batch]
                )
                store.update_reply_texts(db, texts={it.reply_id: it.text for it in batch})
                for it in batch:
                    if it.first_token_at is not None:
                        store.update_reply(db, message_id=it.reply_id, first_token_at=it.first_token_at)
        except Exception as exc:  # noqa: BLE001 - each waiting stream fails its own turn
            for it in batch:
                if not it.done.done():
                    it.done.set_exception(exc)
            return
        self.batches += 1
        for it, (_, frame) in zip(batch, logged):
            self._fan_out(it.event.session_id, frame)
            if not it.done.done():
                it.done.set_result(None)
