"""One websocket connection's microphone buffer: ``audio.start``, binary PCM16 frames,
``audio.clear`` and ``audio.commit``, with ``transcript.partial`` while the user speaks.

A connection has at most one open buffer (a new ``audio.start`` replaces it). Binary frames with no
open buffer keep the answer ``binary_not_expected`` (its message says to send ``audio.start``
first); ``audio.commit`` or ``audio.clear`` without one get ``audio_not_started``. Limits are checked
as frames arrive: the first frame past ``ASSISTANT_AUDIO_MAX_SECONDS`` / ``ASSISTANT_AUDIO_MAX_BYTES``
gets ``audio_too_long`` / ``audio_too_large``, later frames are dropped, and the commit is refused
with the same code (nothing is transcribed or stored).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from assistant import protocol as p
from assistant.audio import PCM16_BYTES_PER_SECOND, SAMPLE_RATE, AudioError, pcm16_to_float
from assistant.speech_input import AudioClip, SpeechFailure, SpeechInput, as_failure

log = logging.getLogger(__name__)

PARTIAL_WINDOW_BYTES = 30 * PCM16_BYTES_PER_SECOND  # partials look at the last 30 s at most


class _Buffer:
    def __init__(self, session_id: str, review: bool, generation: int) -> None:
        self.session_id = session_id
        self.review = review
        self.generation = generation
        self.data = bytearray()
        self.refused: SpeechFailure | None = None  # a limit was passed; the commit gets this error
        self.partial_at = 0  # bytes covered by the last partial request


class AudioStream:
    def __init__(self, *, speech: SpeechInput, user_id: str, conn: Any) -> None:
        self.speech = speech
        self.user_id = user_id
        self.conn = conn  # has send_event(event) and deliver(frame)
        settings = speech.settings
        self.max_seconds = float(settings.audio_max_seconds)
        self.max_bytes = int(settings.audio_max_bytes)
        self.partial_bytes = int(settings.speech_partial_seconds * PCM16_BYTES_PER_SECOND)
        self.buffer: _Buffer | None = None
        self._generation = 0
        self._partial_running = False
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ client events

    def handle(self, event: p.AudioStart | p.AudioClear | p.AudioCommit) -> None:
        """Run one audio event; a fault becomes an ``error`` event echoing its ``event_id``."""
        try:
            if isinstance(event, p.AudioStart):
                self.start(event)
            elif isinstance(event, p.AudioClear):
                self.clear(event)
            else:
                self.commit(event)
        except (SpeechFailure, AudioError) as exc:
            self._send_error(as_failure(exc), event.event_id, event.session_id)

    def start(self, event: p.AudioStart) -> None:
        self.speech.ensure_session(user_id=self.user_id, session_id=event.session_id)
        self._generation += 1
        self.buffer = _Buffer(event.session_id, event.review, self._generation)
        self.conn.send_event(p.AudioStarted(session_id=event.session_id, max_seconds=self.max_seconds, event_id=event.event_id))

    def clear(self, event: p.AudioClear) -> None:
        buf = self._open_for(event.session_id)
        self._generation += 1
        self.buffer = _Buffer(buf.session_id, buf.review, self._generation)
        self.conn.send_event(p.AudioCleared(session_id=event.session_id, event_id=event.event_id))

    def commit(self, event: p.AudioCommit) -> None:
        buf = self._open_for(event.session_id)
        self.buffer = None
        self._generation += 1
        if buf.refused is not None:
            raise buf.refused
        if not buf.data:
            raise SpeechFailure(p.ErrorCode.audio_empty, "no audio was sent between audio.start and audio.commit")
        samples = pcm16_to_float(bytes(buf.data))  # odd length: audio_format_invalid
        clip = AudioClip(samples=samples, data=None, mime_type="audio/wav", source="stream")
        self._spawn(self._commit(buf, clip, event.event_id))

    def feed(self, data: bytes) -> bool:
        """Append a binary frame; False when no buffer is open (the caller answers it)."""
        buf = self.buffer
        if buf is None:
            return False
        if buf.refused is not None:
            return True
        size = len(buf.data) + len(data)
        failure = None
        if size / PCM16_BYTES_PER_SECOND > self.max_seconds:
            failure = SpeechFailure(
                p.ErrorCode.audio_too_long, f"more than {self.max_seconds:g} s of audio; commit sooner or start again"
            )
        elif size > self.max_bytes:
            failure = SpeechFailure(p.ErrorCode.audio_too_large, f"more than {self.max_bytes} bytes of audio")
        if failure is not None:
            buf.refused = failure
            self._send_error(failure, None, buf.session_id)
            return True
        buf.data.extend(data)
        if self.partial_bytes and not self._partial_running and len(buf.data) - buf.partial_at >= self.partial_bytes:
            buf.partial_at = len(buf.data)
            self._partial_running = True
            self._spawn(self._partial(buf, bytes(buf.data[-PARTIAL_WINDOW_BYTES:])))
        return True

    def close(self) -> None:
        self.buffer = None
        for t in list(self._tasks):
            t.cancel()

    # ------------------------------------------------------------------ work off the receive loop

    def _open_for(self, session_id: str) -> _Buffer:
        buf = self.buffer
        if buf is None or buf.session_id != session_id:
            raise SpeechFailure(
                p.ErrorCode.audio_not_started, f"no audio buffer is open for session {session_id!r}; send audio.start first"
            )
        return buf

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_error(self, failure: SpeechFailure, event_id: str | None, session_id: str) -> None:
        self.conn.send_event(p.Error(code=failure.code, message=failure.message, event_id=event_id, session_id=session_id))

    async def _commit(self, buf: _Buffer, clip: AudioClip, event_id: str | None) -> None:
        try:
            final = await self.speech.submit(
                user_id=self.user_id, session_id=buf.session_id, clip=clip, review=buf.review,
                event_id=event_id, sub=self.conn,
            )  # fmt: skip
        except (SpeechFailure, AudioError) as exc:
            self._send_error(as_failure(exc), event_id, buf.session_id)
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the connection survives a bug in one commit
            log.exception("audio.commit failed")
            self._send_error(SpeechFailure(p.ErrorCode.internal_error, "internal error"), event_id, buf.session_id)
            return
        if buf.review:  # a draft for the input box: sent to this connection only, not logged
            self.conn.send_event(final)

    async def _partial(self, buf: _Buffer, data: bytes) -> None:
        try:
            samples = pcm16_to_float(data[: len(data) - len(data) % 2])
            if samples.size < SAMPLE_RATE // 4 or float(np.sqrt(np.mean(np.square(samples)))) < self.speech.limits.silence_rms:
                return
            text, _ = await self.speech.transcribe(samples)
            if text and self.buffer is buf and buf.generation == self._generation:
                self.conn.send_event(p.TranscriptPartial(session_id=buf.session_id, text=text))
        except (SpeechFailure, AudioError):
            pass  # partials are best effort; the commit reports errors
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("partial transcript failed")
        finally:
            self._partial_running = False
