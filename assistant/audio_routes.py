"""HTTP audio upload: ``POST /v1/sessions/{session_id}/audio`` (multipart field ``file``).

The file (webm/opus, ogg, wav, mp3, m4a, ...) is decoded by ffmpeg, transcribed, stored as an audio
attachment (per ``ASSISTANT_AUDIO_RETENTION``) and, unless ``review=true``, becomes a turn whose
reply streams to the session's websocket subscribers like any turn.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile, status
from pydantic import BaseModel

from assistant import protocol as p
from assistant.audio import AudioError, check_size, decode_file
from assistant.auth import User
from assistant.speech_input import AudioClip, SpeechFailure, as_failure

router = APIRouter(prefix="/v1", tags=["audio"])

_STATUS = {
    p.ErrorCode.session_not_found: status.HTTP_404_NOT_FOUND,
    p.ErrorCode.audio_too_large: status.HTTP_413_CONTENT_TOO_LARGE,
    p.ErrorCode.audio_undecodable: status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
    p.ErrorCode.audio_format_invalid: status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
    p.ErrorCode.turn_queue_full: status.HTTP_429_TOO_MANY_REQUESTS,
    p.ErrorCode.skill_unavailable: status.HTTP_503_SERVICE_UNAVAILABLE,
    p.ErrorCode.internal_error: status.HTTP_500_INTERNAL_SERVER_ERROR,
}


class TranscriptOut(BaseModel):
    text: str
    duration_ms: float
    attachment_id: str | None = None
    turn_id: str | None = None
    review: bool = False


def _http_error(failure: SpeechFailure) -> HTTPException:
    code = _STATUS.get(failure.code, status.HTTP_422_UNPROCESSABLE_CONTENT)
    return HTTPException(code, detail={"code": failure.code.value, "message": failure.message})


@router.post("/sessions/{session_id}/audio", response_model=TranscriptOut, response_model_exclude_none=True)
async def upload_audio(
    request: Request,
    user: User,
    session_id: str,
    file: Annotated[UploadFile, File(description="An audio file: webm/opus, ogg, wav, mp3, m4a, ...")],
    review: Annotated[bool, Query(description="Return the transcript only; create no turn.")] = False,
) -> TranscriptOut:
    speech = request.app.state.speech
    try:
        speech.ensure_session(user_id=user.id, session_id=session_id)
        data = await file.read(speech.limits.max_bytes + 1)
        check_size(len(data), speech.limits)
        samples = await asyncio.to_thread(decode_file, data, max_seconds=speech.limits.max_seconds)
        mime = (file.content_type or "application/octet-stream").split(";")[0].strip()[:100]
        clip = AudioClip(samples=samples, data=data, mime_type=mime, source="upload")
        final = await speech.submit(
            user_id=user.id, session_id=session_id, clip=clip, review=review, event_id=None, sub=None
        )
    except (SpeechFailure, AudioError) as exc:
        raise _http_error(as_failure(exc)) from None
    return TranscriptOut(
        text=final.text,
        duration_ms=final.duration_ms,
        attachment_id=final.attachment_id,
        turn_id=final.turn_id,
        review=final.review,
    )
