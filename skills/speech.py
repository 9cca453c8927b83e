"""Speech-to-text: an input stage, not a reply skill. It turns audio into the text of a turn, which
then goes to the router like a typed one. It sits in the registry so health and readiness cover it."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from skills.base import SkillError, SkillRequest, SkillStatus
from skills.speech_worker import ModelLoadError, SpeechWorker, SpeechWorkerOptions, Transcription

log = logging.getLogger(__name__)


class SpeechSkill:
    name = "speech"
    # Input stages feed the router; they are never routed to and never answer a turn.
    input_stage = True

    def __init__(self, options: SpeechWorkerOptions, *, enabled: bool = True) -> None:
        self.worker = SpeechWorker(options)
        self._enabled = enabled
        self._state = "loading" if enabled else "disabled"
        self._detail: str | None = None
        self._ready = asyncio.Event()

    def status(self) -> SkillStatus:
        return SkillStatus(state=self._state, detail=self._detail, extra={"model": self.worker.options.model})  # type: ignore[arg-type]

    async def start(self) -> None:
        if not self._enabled:
            self._ready.set()
            return
        try:
            await asyncio.to_thread(self.worker.load)
            self._state = "ready"
        except ModelLoadError as exc:
            self._state, self._detail = "unavailable", str(exc)
            log.error("speech skill unavailable: %s", exc)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving without this skill
            self._state = "unavailable"
            self._detail = f"speech model failed to start: {exc}; check ASSISTANT_SPEECH_MODEL"
            log.exception("speech skill failed to start")
        finally:
            self._ready.set()

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.close)

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self._state != "ready":
            raise SkillError(
                "skill_unavailable",
                f"speech recognition is {self._state}: "
                f"{self._detail or 'turned off; set ASSISTANT_SPEECH_MODEL (and ASSISTANT_LOAD_MODELS) to enable it'}",
            )

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


def build_speech_skill(settings) -> SpeechSkill:  # noqa: ANN001 - assistant.settings.Settings
    return SpeechSkill(
        SpeechWorkerOptions(
            model=settings.speech_model,
            device=settings.speech_device,
            language=settings.speech_language or None,
            batch_size=settings.speech_batch_size,
            batch_wait_ms=settings.speech_batch_wait_ms,
            max_tokens=settings.speech_max_tokens,
        ),
        # An empty ASSISTANT_SPEECH_MODEL turns speech off (status "disabled").
        enabled=settings.load_models and bool(settings.speech_model.strip()),
    )
