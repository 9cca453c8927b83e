"""What every model-backed skill shares: loading its worker off the event loop, readiness, and a
typed ``skill_unavailable`` when it cannot serve. Subclasses set ``name``, ``setting`` (the variable
that names the model) and ``self.worker`` (with ``options.model``, a blocking ``load()`` and
``close()`` or ``aclose()``)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from skills.base import SkillError, SkillStatus

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message names the setting to change."""


class ModelSkill:
    name = "model"
    setting = "ASSISTANT_*_MODEL"
    worker: Any

    def __init__(self, *, enabled: bool = True) -> None:
        self._enabled = enabled
        self._state = "loading" if enabled else "disabled"
        self._detail: str | None = None
        self._ready = asyncio.Event()

    def status(self) -> SkillStatus:
        extra = {"model": self.worker.options.model}  # type: ignore[attr-defined]
        engine = getattr(self.worker, "engine", None)  # which batching engine serves, once loaded
        if isinstance(engine, str) and engine:
            extra["engine"] = engine
        return SkillStatus(state=self._state, detail=self._detail, extra=extra)

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
            self._detail = f"{self.name} model failed to start: {exc}; check {self.setting}"
            log.exception("%s skill failed to start", self.name)
        finally:
            self._ready.set()

    async def stop(self) -> None:
        aclose = getattr(self.worker, "aclose", None)
        if aclose is not None and inspect.iscoroutinefunction(aclose):
            await aclose()
        else:
            await asyncio.to_thread(self.worker.close)

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self._state != "ready":
            detail = self._detail or f"turned off; set {self.setting} (and ASSISTANT_LOAD_MODELS) to enable it"
            raise SkillError("skill_unavailable", f"the {self.name} skill is {self._state}: {detail}")
