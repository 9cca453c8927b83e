"""A chat run (skills/chat.py) over the real chat worker: its deltas join to the decode of the
tokens generated, a cancel ends it at once, and a generation loop that dies mid-reply fails the run
within the watchdog's second instead of leaving the user waiting forever."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from skills.base import SkillError
from skills.chat import ChatRun
from skills.chat_worker import ChatWorker, ChatWorkerOptions


@pytest.fixture
def worker(tiny_chat_model: Path):  # noqa: ANN201
    w = ChatWorker(ChatWorkerOptions(model=str(tiny_chat_model), device="cpu", max_new_tokens=48, context_tokens=64))
    w.load()
    yield w
    w.close()


def start(worker: ChatWorker, name: str, max_new: int) -> ChatRun:
    prompt = worker.tokenizer("hello there")["input_ids"]
    run = ChatRun(worker, name, prompt)
    worker.submit(request_id=name, prompt_ids=prompt, max_new_tokens=max_new, on_output=run.on_output)
    return run


def test_deltas_join_to_the_decode_of_the_reply(worker: ChatWorker) -> None:
    async def main() -> tuple[str, ChatRun]:
        run = start(worker, "whole", 40)
        return "".join([d async for d in run]), run

    text, run = asyncio.run(main())
    assert run.usage.completion_tokens == 40
    assert text and text == worker.tokenizer.decode(run._tokens, skip_special_tokens=True)


def test_a_cancel_ends_the_run_at_once(worker: ChatWorker) -> None:
    async def main() -> tuple[int, float]:
        run = start(worker, "cut", 48)
        got, cancelled_at = 0, 0.0
        async for _ in run:
            got += 1
            if got == 2:
                cancelled_at = time.monotonic()
                run.cancel()
        return got, time.monotonic() - cancelled_at

    got, after = asyncio.run(main())
    assert got == 2 and after < 0.5
    deadline = time.monotonic() + 5
    while "cut" in worker.active_request_ids():  # the generation thread takes the cancel on its next turn
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.01)


def test_a_generation_loop_that_dies_mid_reply_fails_the_run(worker: ChatWorker) -> None:
    async def main() -> tuple[int, float]:
        run = start(worker, "orphan", 48)
        got, stopped_at = 0, 0.0
        with pytest.raises(SkillError) as err:
            async for _ in run:
                got += 1
                if got == 1:
                    stopped_at = time.monotonic()
                    await asyncio.to_thread(worker._manager.stop, True, 10)  # the loop dies, the reply unfinished
        assert err.value.code == "generation_failed" and "stopped" in str(err.value)
        return got, time.monotonic() - stopped_at

    got, after = asyncio.run(asyncio.wait_for(main(), 20))  # a run left waiting fails here, not the suite
    assert got >= 1 and after < 3.0
