"""Speech-to-text: an input stage, not a reply skill. It turns audio into the text of a turn, which
then goes to the router like a typed one. It sits in the registry so health and readiness cover it."""

from __future__ import annotations

import asyncio

import numpy as np

from skills.base import SkillError, SkillRequest
from skills.chat_first import ChatFirst
from skills.lifecycle import ModelSkill
from skills.speech_worker import SpeechWorker, SpeechWorkerOptions, Transcription


class SpeechSkill(ModelSkill):
    name = "speech"
    setting = "ASSISTANT_SPEECH_MODEL"
    # Input stages feed the router; they are never routed to and never answer a turn.
    input_stage = True

    def __init__(self, options: SpeechWorkerOptions, *, enabled: bool = True) -> None:
        super().__init__(enabled=enabled)
        self.worker = SpeechWorker(options)

    async def transcribe(self, samples: np.ndarray) -> Transcription:
        """Transcribe 16 kHz mono float32 audio on the worker, batched with other sessions' audio."""
        await self.wait_ready()
        try:
            future = self.worker.submit(samples)
        except RuntimeError as exc:
            raise SkillError("skill_unavailable", str(exc)) from exc
        try:
            return await asyncio.wrap_future(future)
        except Exception as exc:  # noqa: BLE001 - the worker logged it; the caller gets a typed error
            raise SkillError("internal_error", f"speech recognition failed: {type(exc).__name__}: {exc}") from exc

    async def run(self, request: SkillRequest):  # noqa: ANN201
        raise SkillError(
            "skill_unknown", "speech is an input stage: send audio (audio.start / upload); it does not answer turns"
        )


def build_speech_skill(settings, chat_first: ChatFirst | None = None) -> SpeechSkill:  # noqa: ANN001 - assistant.settings.Settings
    from skills.registry import in_child_process

    return SpeechSkill(
        SpeechWorkerOptions(
            model=settings.speech_model,
            device=settings.speech_device,
            language=settings.speech_language or None,
            batch_size=settings.speech_batch_size,
            batch_wait_ms=settings.speech_batch_wait_ms,
            max_tokens=settings.speech_max_tokens,
            engine=settings.speech_engine,
            in_process=not in_child_process(settings.media_worker, settings.speech_device),
            chat_first=chat_first,
        ),
        # An empty ASSISTANT_SPEECH_MODEL turns speech off (status "disabled").
        enabled=settings.load_models and bool(settings.speech_model.strip()),
    )
