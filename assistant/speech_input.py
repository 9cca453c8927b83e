"""Spoken turns: checked audio → transcript → stored audio + a turn, as if the text had been typed.

Shared by the websocket (``audio.commit``) and the HTTP upload. Order: the session is the user's,
the audio passes its checks, the speech worker transcribes it, and only then is anything stored:
the audio attachment (unless ``ASSISTANT_AUDIO_RETENTION=discard``) and the turn go in one
transaction, and ``transcript.final`` is logged just before ``turn.created``. A failure at any step
stores nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from assistant import protocol as p
from assistant.audio import AudioError, AudioLimits, check_samples, float_to_wav
from assistant.dialogue import DialogueError, Subscriber
from skills.base import SkillError
from state import store
from state.attachments import SessionGone, add_attachment, release_blobs


class SpeechFailure(Exception):
    """Any typed fault of a spoken turn, carrying the protocol error code."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def as_failure(exc: Exception) -> SpeechFailure:
    if isinstance(exc, SpeechFailure):
        return exc
    if isinstance(exc, (AudioError, DialogueError)):
        return SpeechFailure(exc.code, exc.message)
    if isinstance(exc, SkillError):
        code = exc.code if exc.code in p.ErrorCode.__members__ else "internal_error"
        return SpeechFailure(p.ErrorCode(code), exc.message)
    raise exc


@dataclass(frozen=True)
class AudioClip:
    samples: np.ndarray  # 16 kHz mono float32
    data: bytes | None  # the file as received (None: streamed PCM, kept as WAV)
    mime_type: str
    source: str  # "stream" | "upload"


def audio_limits(settings: Any) -> AudioLimits:
    return AudioLimits(
        max_seconds=settings.audio_max_seconds,
        max_bytes=settings.audio_max_bytes,
        silence_rms=settings.audio_silence_rms,
    )


class SpeechInput:
    """Turns audio into transcripts and spoken turns for one app (``app.state``)."""

    def __init__(self, state: Any) -> None:
        self.settings = state.settings
        self.sessions = state.sessions
        self.dialogue = state.dialogue
        self.blobs = state.blobs
        self.skills = state.skills
        self.limits = audio_limits(state.settings)

    def ensure_session(self, *, user_id: str, session_id: str) -> None:
        with self.sessions() as db:
            if store.get_session(db, session_id=session_id, user_id=user_id) is None:
                raise SpeechFailure(p.ErrorCode.session_not_found, f"no session {session_id!r} for this user")

    async def transcribe(self, samples: np.ndarray) -> tuple[str, str | None]:
        skill = self.skills.get("speech")
        if skill is None:
            raise SpeechFailure(p.ErrorCode.skill_unavailable, "this server has no speech skill")
        try:
            result = await skill.transcribe(samples)
        except SkillError as exc:
            raise as_failure(exc) from None
        return result.text, result.language

    async def submit(
        self,
        *,
        user_id: str,
        session_id: str,
        clip: AudioClip,
        review: bool,
        event_id: str | None,
        sub: Subscriber | None,
    ) -> p.TranscriptFinal:
        """Transcribe ``clip``; unless ``review``, create and queue the turn. Raises ``SpeechFailure``."""
        self.ensure_session(user_id=user_id, session_id=session_id)
        try:
            duration_ms = check_samples(clip.samples, self.limits)
        except AudioError as exc:
            raise as_failure(exc) from None
        text, language = await self.transcribe(clip.samples)
        if not text:
            raise SpeechFailure(p.ErrorCode.audio_silent, "no speech was recognised in the audio; try again closer to the microphone")
        blob = await self._audio_bytes(clip)
        shas = [blob[0]] if blob is not None else []
        meta = {"duration_ms": duration_ms, "transcript": text, "language": language, "source": clip.source}

        def attach(db: Session, turn_id: str | None) -> str | None:
            if blob is None:
                return None
            sha, data = blob
            row = add_attachment(
                db, user_id=user_id, session_id=session_id, sha256=sha, kind="audio",
                mime_type=clip.mime_type, size_bytes=len(data), meta={**meta, "turn_id": turn_id},
            )  # fmt: skip
            return row.id

        try:
            with self.blobs.pinned(shas):  # a session deleted meanwhile leaves the file alone
                if blob is not None:
                    await asyncio.to_thread(self.blobs.write, *blob)
                if review:
                    with self.sessions.begin() as db:
                        attachment_id = attach(db, None)
                    return p.TranscriptFinal(
                        session_id=session_id, text=text, duration_ms=duration_ms, review=True,
                        attachment_id=attachment_id, event_id=event_id,
                    )  # fmt: skip
                final: list[p.TranscriptFinal] = []

                def on_store(db: Session, turn_id: str) -> p.TranscriptFinal:
                    final.append(
                        p.TranscriptFinal(
                            session_id=session_id, text=text, duration_ms=duration_ms, review=False,
                            turn_id=turn_id, attachment_id=attach(db, turn_id), event_id=event_id,
                        )  # fmt: skip
                    )
                    return final[0]

                self.dialogue.create_turn(
                    user_id=user_id,
                    event=p.TurnCreate(session_id=session_id, text=text, event_id=event_id),
                    sub=sub,
                    input_kind="speech",
                    on_store=on_store,
                )
                return final[0]
        except BaseException as exc:
            if shas:  # the turn was refused: remove the audio unless another row refers to the same bytes
                await asyncio.to_thread(release_blobs, self.sessions, self.blobs, shas)
            if isinstance(exc, DialogueError):
                raise as_failure(exc) from None
            if isinstance(exc, SessionGone):  # deleted while the audio was transcribed
                raise SpeechFailure(p.ErrorCode.session_not_found, f"no session {session_id!r} for this user") from None
            raise

    async def _audio_bytes(self, clip: AudioClip) -> tuple[str, bytes] | None:
        """The audio to store, and its sha256; None when retention is "discard"."""
        if self.settings.audio_retention == "discard":
            return None
        data = clip.data if clip.data is not None else await asyncio.to_thread(float_to_wav, clip.samples)
        return hashlib.sha256(data).hexdigest(), data
