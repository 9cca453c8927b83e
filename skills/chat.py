"""Chat generation: builds the multi-turn prompt from the history and streams the model's reply."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from skills.base import HistoryItem, SkillError, SkillRequest, SkillStatus, SkillUsage
from skills.chat_process import ChatProcessWorker
from skills.chat_worker import ChatWorker, ChatWorkerOptions
from skills.detokenize import IncrementalDetokenizer
from skills.lifecycle import ModelLoadError, ModelSkill

log = logging.getLogger(__name__)

# How long a stream may see no output while the generation loop is dead before it fails.
_WATCHDOG_SECONDS = 1.0


def build_prompt(
    tokenizer: Any, *, system: str | None, history: list[HistoryItem], budget: int
) -> tuple[list[int], int]:
    """Apply the chat template to (system, history); drop the oldest messages until the prompt fits
    ``budget`` tokens. The last message (the new user turn) is always kept. Returns (ids, dropped)."""
    head = [{"role": "system", "content": system}] if system else []
    msgs = [{"role": h.role, "content": h.text} for h in history]
    dropped = 0
    while True:
        ids = tokenizer.apply_chat_template(head + msgs, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in transformers 5
            ids = list(ids["input_ids"])
        if len(ids) <= budget:
            return ids, dropped
        if len(msgs) <= 1:
            raise SkillError(
                "context_too_long",
                f"the message needs {len(ids)} prompt tokens but the budget is {budget}; "
                "send a shorter message or raise ASSISTANT_CHAT_CONTEXT_TOKENS",
            )
        # Drop the oldest message; never leave an assistant message first.
        msgs.pop(0)
        dropped += 1
        while len(msgs) > 1 and msgs[0]["role"] == "assistant":
            msgs.pop(0)
            dropped += 1


class ChatRun:
    """One streaming generation; iterate for text deltas."""

    def __init__(self, worker: ChatWorker | ChatProcessWorker, request_id: str, prompt_ids: list[int]) -> None:
        self._worker = worker
        self.request_id = request_id
        self.usage = SkillUsage(prompt_tokens=len(prompt_ids))
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = False
        self._tokens: list[int] = []
        self._text = IncrementalDetokenizer(worker.tokenizer)

    def on_output(self, output: Any) -> None:
        self._queue.put_nowait(output)

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._worker.cancel(self.request_id)
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[str]:
        finished = False
        while not finished and not self._cancelled:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=_WATCHDOG_SECONDS)
            except TimeoutError:
                if not self._worker.is_running():
                    raise SkillError("generation_failed", "the chat generation loop stopped") from None
                continue
            # Drain what else has arrived: one frame for many tokens when the loop is busy.
            items = [item]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            outs = [out for out in items if out is not None]
            for out in outs:
                if out.error:
                    raise SkillError("generation_failed", f"generation failed: {out.error}")
                finished = finished or out.is_finished()
            if outs:  # each output holds every token so far: the last one is enough
                generated = outs[-1].generated_tokens
                self.usage.completion_tokens = len(generated)
                self._tokens = generated[:-1] if generated and generated[-1] in self._worker.eos_token_ids else generated
            if self._cancelled:
                break
            delta = self._text.delta(self._tokens, final=finished)
            if delta:
                yield delta


class ChatSkill(ModelSkill):
    name = "chat"
    setting = "ASSISTANT_CHAT_MODEL"

    def __init__(
        self,
        options: ChatWorkerOptions,
        *,
        system_prompt: str | None,
        context_tokens: int,
        enabled: bool = True,
        in_process: bool = True,
    ) -> None:
        super().__init__(enabled=enabled)
        self.worker = ChatWorker(options) if in_process else ChatProcessWorker(options)
        self.system_prompt = system_prompt
        self.context_tokens = context_tokens
        self._restart_lock = asyncio.Lock()

    def status(self) -> SkillStatus:
        st = super().status()
        if st.state == "ready" and not self.worker.is_running():
            if isinstance(self.worker, ChatProcessWorker):
                detail = "the chat model's process exited; the next turn restarts it"
            else:
                detail = "the chat generation loop stopped; restart the server"
            return SkillStatus(state="unavailable", detail=detail, extra=st.extra)
        return st

    async def _restart_if_exited(self) -> None:
        """A crashed model process failed its running turns; start a new one for the next turn."""
        if self.worker.is_running() or not isinstance(self.worker, ChatProcessWorker):
            return
        async with self._restart_lock:
            if not self.worker.is_running():
                log.warning("the chat model's process exited; starting a new one")
                try:
                    await asyncio.to_thread(self.worker.load)
                except ModelLoadError as exc:
                    raise SkillError("skill_unavailable", f"the chat model could not be restarted: {exc}") from exc

    async def run(self, request: SkillRequest) -> ChatRun:
        await self.wait_ready()
        await self._restart_if_exited()
        history = [*request.history, HistoryItem(role="user", text=request.text)]
        budget = self.context_tokens
        if self.worker.max_positions:
            budget = min(budget, self.worker.max_positions - 1)
        prompt_ids, dropped = build_prompt(
            self.worker.tokenizer, system=self.system_prompt, history=history, budget=budget
        )
        if dropped:
            log.info("turn %s: dropped %d oldest messages to fit %d tokens", request.turn_id, dropped, budget)
        max_new = self.worker.options.max_new_tokens
        if self.worker.max_positions:
            max_new = max(1, min(max_new, self.worker.max_positions - len(prompt_ids)))
        run = ChatRun(self.worker, f"{request.turn_id}-{uuid.uuid4().hex[:8]}", prompt_ids)
        try:
            self.worker.submit(
                request_id=run.request_id, prompt_ids=prompt_ids, max_new_tokens=max_new, on_output=run.on_output
            )
        except RuntimeError as exc:
            raise SkillError("skill_unavailable", str(exc)) from exc
        return run
