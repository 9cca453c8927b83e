"""Skills that exist only for benchmarks, served through the real server and protocol:

* ``NaiveChatSkill``: the naive baseline: the same model behind a lock, one eager
  ``model.generate`` at a time (a streamer hands each token to the event loop);
* ``FloodSkill``: no model at all, replies with N one-word deltas as fast as the loop runs, to
  measure what the web process alone can send (frames/s).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from skills.base import HistoryItem, ModelFreeSkill, SkillRequest, SkillUsage
from skills.chat import build_prompt
from skills.chat_worker import ChatWorkerOptions, _resolve_device, _resolve_dtype
from skills.lifecycle import ModelSkill


class _NaiveWorker:
    def __init__(self, options: ChatWorkerOptions) -> None:
        self.options = options
        self.model: Any = None
        self.tokenizer: Any = None
        self.lock = threading.Lock()  # one generate at a time, whoever asks

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = _resolve_device(torch, self.options.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.options.model)
        model = AutoModelForCausalLM.from_pretrained(self.options.model, dtype=_resolve_dtype(torch, self.options.dtype, device))
        self.model = model.to(device).eval()

    def close(self) -> None:
        self.model = None


class _NaiveRun:
    def __init__(self, worker: _NaiveWorker, prompt_ids: list[int], max_new_tokens: int) -> None:
        self.usage = SkillUsage(prompt_tokens=len(prompt_ids))
        self._worker, self._prompt, self._max_new = worker, prompt_ids, max_new_tokens
        self._stop = threading.Event()

    def cancel(self) -> None:
        self._stop.set()

    def _generate(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        stop = self._stop

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                loop.call_soon_threadsafe(queue.put_nowait, value.reshape(-1).tolist())

            def end(self) -> None:
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        w = self._worker
        try:
            with w.lock, torch.inference_mode():
                if not stop.is_set():
                    ids = torch.tensor([self._prompt], device=w.model.device)
                    w.model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=self._max_new,
                        do_sample=False,
                        streamer=Streamer(),
                        stopping_criteria=StoppingCriteriaList([Cancelled()]),
                        pad_token_id=w.tokenizer.pad_token_id,
                    )
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = loop.run_in_executor(None, self._generate, loop, queue)
        tokens: list[int] = []
        sent = ""
        try:
            while (item := await queue.get()) is not None:
                tokens.extend(item)
                while not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt is None:
                        queue.put_nowait(None)
                        break
                    tokens.extend(nxt)
                self.usage.completion_tokens = len(tokens)
                text = self._worker.tokenizer.decode(tokens, skip_special_tokens=True)
                delta, sent = text[len(sent) :], text
                if delta:
                    yield delta
        finally:
            self._stop.set()
            await job


class NaiveChatSkill(ModelSkill):
    name = "chat"
    setting = "--chat-model"

    def __init__(self, options: ChatWorkerOptions, *, system_prompt: str | None, context_tokens: int) -> None:
        super().__init__()
        self.worker = _NaiveWorker(options)
        self.system_prompt, self.context_tokens = system_prompt, context_tokens

    async def run(self, request: SkillRequest) -> _NaiveRun:
        await self.wait_ready()
        history = [*request.history, HistoryItem(role="user", text=request.text)]
        ids, _ = build_prompt(self.worker.tokenizer, system=self.system_prompt, history=history, budget=self.context_tokens)
        return _NaiveRun(self.worker, ids, self.worker.options.max_new_tokens)


class _FloodRun:
    def __init__(self, words: int, pace_s: float = 0.0) -> None:
        self.usage = SkillUsage(prompt_tokens=1)
        self._words = words
        self._pace = pace_s
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    async def __aiter__(self) -> AsyncIterator[str]:
        for i in range(self._words):
            if self._cancelled:
                return
            self.usage.completion_tokens = i + 1
            yield f" w{i}"
            await asyncio.sleep(self._pace)  # 0: let every other session's stream and the sockets run


class FloodSkill(ModelFreeSkill):
    name = "chat"

    def __init__(self, words: int, pace_s: float = 0.0) -> None:
        self.words = words
        self.pace_s = pace_s  # seconds between words (a model's time per output token)

    async def run(self, request: SkillRequest) -> _FloodRun:
        return _FloodRun(self.words, self.pace_s)
