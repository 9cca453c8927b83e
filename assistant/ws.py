"""The websocket endpoint: frames in, events out. Parsing is in ``protocol``; behaviour in ``dialogue``."""

from __future__ import annotations

import asyncio
import logging

from fastapi import WebSocket, WebSocketDisconnect

from assistant import __version__
from assistant import protocol as p
from assistant.audio_stream import AudioStream
from assistant.auth import authenticate, token_from
from assistant.dialogue import DialogueError, DialogueManager

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 1013
# A replay's frames sent between two turns of the event loop: 128 (~1.5 ms on the 2-core CPU), or
# fewer once they hold 256 KiB (batched replays' frames hold many events each).
REPLAY_YIELD_FRAMES = 128
REPLAY_YIELD_CHARS = 256 * 1024


class Connection:
    """One client. Events are queued and written by a single sender task, in order; a client that
    falls too far behind is disconnected (it can resume with ``last_seq``)."""

    def __init__(self, ws: WebSocket, max_queue: int, metrics) -> None:  # noqa: ANN001
        self.ws = ws
        self.queue: asyncio.Queue[str | list[str] | None] = asyncio.Queue(maxsize=max_queue)
        self.metrics = metrics
        self.overflowed = False
        self.audio: AudioStream | None = None  # set once the user is known

    def deliver(self, frame: str) -> None:
        self._put(frame)

    def replay(self, frames: list[str]) -> None:
        """Queue a session's logged frames as one item: a long conversation opened from seq 0 holds
        more frames than the live-event limit, and is no sign of a slow client."""
        self._put(frames)

    def _put(self, item: str | list[str]) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            if not self.overflowed:
                self.overflowed = True
                log.warning("client too slow; closing its connection")
                asyncio.get_running_loop().create_task(self.ws.close(CLOSE_TOO_SLOW, "client too slow; resume"))

    def send_event(self, event: p.BaseModel) -> None:
        if isinstance(event, p.Error):
            self.metrics.errors.labels(event.code.value).inc()
        self.deliver(p.dump_event(event))

    async def sender(self) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                return
            # Coalesce nothing at this level: each event is one frame, written as soon as possible.
            frames = sent = 0
            for frame in [item] if isinstance(item, str) else item:
                await self.ws.send_text(frame)
                self.metrics.frames.inc()
                frames, sent = frames + 1, sent + len(frame)
                if frames == REPLAY_YIELD_FRAMES or sent >= REPLAY_YIELD_CHARS:
                    frames = sent = 0
                    await asyncio.sleep(0)  # a long replay lets the other connections run between its frames


async def websocket_endpoint(ws: WebSocket) -> None:
    app = ws.app
    settings, dialogue, metrics = app.state.settings, app.state.dialogue, app.state.metrics
    await ws.accept()
    token = token_from(ws.headers.get("authorization"), ws.query_params.get("token"))
    user = authenticate(app.state.sessions, token)
    if user is None:
        metrics.errors.labels("unauthorized").inc()
        await ws.send_text(
            p.dump_event(p.Error(code=p.ErrorCode.unauthorized, message="a valid bearer token is required"))
        )
        await ws.close(CLOSE_UNAUTHORIZED, "unauthorized")
        return
    conn = Connection(ws, settings.max_outbound_queue, metrics)
    conn.audio = AudioStream(speech=app.state.speech, user_id=user.id, conn=conn)
    sender = asyncio.create_task(conn.sender())
    metrics.connections.inc()
    conn.send_event(
        p.ServerHello(
            server_version=__version__,
            user=user.name,
            skills=app.state.skill_states(),
            model_profile=app.state.model_plan.effective,
            limits={
                "max_frame_bytes": settings.max_frame_bytes,
                "max_text_chars": settings.max_text_chars,
                "max_queued_turns": settings.max_queued_turns,
                "max_image_bytes": settings.image_max_bytes,
                "max_image_pixels": settings.image_max_pixels,
            },
        )
    )
    try:
        while not sender.done():
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                # Binary frames are audio for the buffer opened by audio.start; none is open here.
                if not conn.audio.feed(message["bytes"]):
                    conn.send_event(
                        p.Error(
                            code=p.ErrorCode.binary_not_expected,
                            message="binary frames carry audio only after audio.start; send JSON text events",
                        )
                    )
                continue
            await handle_text(message.get("text") or "", conn, user.id, dialogue, settings.max_frame_bytes)
    except WebSocketDisconnect:
        pass
    finally:
        metrics.connections.dec()
        conn.audio.close()
        # The stream refers back to the connection: without this cycle the connection, its websocket
        # and its queue are freed here, not by a full garbage collection (skills/gc_pauses.py).
        conn.audio = None
        dialogue.detach(conn)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)


async def handle_text(raw: str, conn: Connection, user_id: str, dialogue: DialogueManager, max_bytes: int) -> None:
    """Handle one text frame. The connection's next frame waits for this one's turn to be stored
    (a turn is admitted with every other connection's of the same loop turn, in one transaction),
    so a client's events take effect in the order it sent them."""
    size = len(raw.encode())
    if size > max_bytes:
        conn.send_event(p.Error(code=p.ErrorCode.frame_too_large, message=f"frame is {size} bytes; the limit is {max_bytes}"))
        return
    try:
        event = p.parse_client_event(raw)
    except p.ProtocolError as exc:
        conn.send_event(exc.to_event())
        return
    try:
        admitted = dispatch(event, conn, user_id, dialogue)
        if admitted is not None:
            await admitted
    except DialogueError as exc:
        conn.send_event(
            p.Error(code=exc.code, message=exc.message, event_id=event.event_id, session_id=exc.session_id, turn_id=exc.turn_id)
        )
    except Exception:  # noqa: BLE001 - the connection survives a bug in one event
        log.exception("event %s failed", event.type)
        conn.send_event(p.Error(code=p.ErrorCode.internal_error, message="internal error", event_id=event.event_id))


def dispatch(event: p.ClientEvent, conn: Connection, user_id: str, dialogue: DialogueManager) -> asyncio.Future | None:
    """Act on one event; a turn's admission is returned to be awaited."""
    match event:
        case p.SessionCreate():
            dialogue.create_session(user_id=user_id, title=event.title, sub=conn, event_id=event.event_id)
        case p.SessionResume():
            dialogue.resume(
                user_id=user_id, session_id=event.session_id, last_seq=event.last_seq, sub=conn, event_id=event.event_id,
                batch=event.batch,
            )  # fmt: skip
        case p.TurnCreate():
            return dialogue.submit_turn(user_id=user_id, event=event, sub=conn)
        case p.ResponseCancel():
            dialogue.cancel(user_id=user_id, event=event)
        case p.Ping():
            conn.send_event(p.Pong(event_id=event.event_id))
        case p.AudioStart() | p.AudioClear() | p.AudioCommit():
            conn.audio.handle(event)
        case _:
            raise DialogueError(p.ErrorCode.unknown_event, f"{event.type} is not handled by this server")
    return None
