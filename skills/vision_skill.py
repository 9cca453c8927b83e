"""What captioning and VQA share: readiness, and a run that awaits one batched worker result."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from skills.base import SkillError, SkillRequest, SkillUsage
from skills.lifecycle import ModelSkill
from skills.vision_worker import VisionWorker, VisionWorkerOptions


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


class VisionSkill(ModelSkill):
    """Base for image-to-text skills; subclasses set ``name`` and ``question()``."""

    name = "vision"

    def __init__(self, options: VisionWorkerOptions, *, enabled: bool = True) -> None:
        super().__init__(enabled=enabled)
        self.worker = VisionWorker(options)
        self.setting = options.setting

    def question(self, request: SkillRequest) -> str | None:
        raise NotImplementedError

    async def run(self, request: SkillRequest) -> VisionRun:
        if not request.images:
            raise SkillError(
                "no_image",
                f"the {self.name} skill needs an image: upload one and attach it to the turn, "
                "or refer to an earlier image of this session",
            )
        await self.wait_ready()
        return VisionRun(self.worker.submit(request.images[-1], self.question(request)))
