"""What captioning and VQA share: readiness, and a run that awaits one batched worker result."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from skills.base import SkillError, SkillRequest, SkillStatus, SkillUsage
from skills.vision_worker import ModelLoadError, VisionWorker, VisionWorkerOptions

log = logging.getLogger(__name__)


class VisionRun:
    """One image on the worker; yields the whole answer as one delta (generation is batched, not streamed)."""

    def __init__(self, future: asyncio.Future) -> None:
        self._future = future
        self._cancelled = False
        self.usage = SkillUsage()

    def cancel(self) -> None:
        self._cancelled = True
        self._future.cancel()

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            text, tokens = await self._future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._cancelled and not (task is not None and task.cancelling()):
                return  # cancelled through cancel(): end quietly
            self._future.cancel()
            raise
        self.usage.completion_tokens = tokens
        if text:
            yield text


class VisionSkill:
    """Base for image-to-text skills; subclasses set ``name`` and ``question()``."""

    name = "vision"

    def __init__(self, options: VisionWorkerOptions, *, enabled: bool = True) -> None:
        self.worker = VisionWorker(options)
        self._enabled = enabled
        self._state = "loading" if enabled else "disabled"
        self._detail: str | None = None
        self._ready = asyncio.Event()

    def question(self, request: SkillRequest) -> str | None:
        raise NotImplementedError

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
            log.error("%s skill unavailable: %s", self.name, exc)
        except Exception as exc:  # noqa: BLE001 - the server keeps serving without this skill
            self._state = "unavailable"
            self._detail = f"{self.name} model failed to start: {exc}; check {self.worker.options.setting}"
            log.exception("%s skill failed to start", self.name)
        finally:
            self._ready.set()

    async def stop(self) -> None:
        await self.worker.aclose()

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self._state != "ready":
            raise SkillError(
                "skill_unavailable",
                f"the {self.name} skill is {self._state}: "
                f"{self._detail or f'turned off; set {self.worker.options.setting} and ASSISTANT_LOAD_MODELS'}",
            )

    async def run(self, request: SkillRequest) -> VisionRun:
        if not request.images:
            raise SkillError(
                "no_image",
                f"the {self.name} skill needs an image: upload one and attach it to the turn, "
                "or refer to an earlier image of this session",
            )
        await self.wait_ready()
        return VisionRun(self.worker.submit(request.images[-1], self.question(request)))
