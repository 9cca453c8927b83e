"""The chat model in a child process: a crash of that process fails only the running turn, with a
typed error, the server keeps serving, and the next turn starts a new model process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from skills.chat_process import ChatProcessWorker
from tests.conftest import LiveServer, make_settings, start_server, ws_client


@pytest.fixture(scope="module")
def proc_server(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("proc"), tiny_chat_model, chat_max_new_tokens=3000, chat_worker="process"
    )
    live = start_server(settings)
    yield live
    live.stop()


def chat_state(live: LiveServer) -> str:
    return httpx.get(f"{live.http}/healthz").json()["skills"]["chat"]["state"]


def test_the_model_runs_in_another_process(proc_server: LiveServer) -> None:
    import os

    worker = proc_server.app.state.skills["chat"].worker
    assert isinstance(worker, ChatProcessWorker)
    assert worker._proc.pid != os.getpid() and worker._proc.is_alive()
    assert chat_state(proc_server) == "ready"
    # Torch, transformers and the model, frozen out of the child's full garbage collections (skills/gc_pauses.py).
    assert worker.frozen_objects > 100_000, worker.frozen_objects


def test_a_crashed_model_process_fails_the_turn_and_the_next_turn_restarts_it(proc_server: LiveServer) -> None:
    token = proc_server.token("carol")
    worker = proc_server.app.state.skills["chat"].worker
    old_pid = worker._proc.pid

    async def go() -> tuple[dict, str, dict]:
        async with ws_client(proc_server, token) as c:
            sid = await c.new_session()
            eid = await c.send(type="turn.create", session_id=sid, text="a long story please")
            tid = (await c.until_type("turn.created", event_id=eid))["turn_id"]
            for _ in range(3):
                await c.until_type("response.delta", turn_id=tid)
            worker._proc.kill()
            failed = await c.until_type("response.done", turn_id=tid)
            deadline = time.monotonic() + 10
            while chat_state(proc_server) != "unavailable" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            state = chat_state(proc_server)
            # The same connection still works, and the next turn gets a fresh model process.
            eid = await c.send(type="turn.create", session_id=sid, text="try again", skill="chat")
            tid2 = (await c.until_type("turn.created", event_id=eid))["turn_id"]
            await c.until_type("response.delta", turn_id=tid2, timeout=120)
            await c.send(type="response.cancel", session_id=sid, turn_id=tid2)
            second = await c.until_type("response.done", turn_id=tid2)
            return failed, state, second

    failed, state_after_crash, second = asyncio.run(go())
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "generation_failed" and "exited" in failed["error"]["message"]
    assert failed["text"], "the text streamed before the crash is kept"
    assert state_after_crash == "unavailable"
    assert second["status"] == "cancelled" and second["usage"]["completion_tokens"] > 0
    assert worker._proc.pid != old_pid and worker._proc.is_alive()
    assert chat_state(proc_server) == "ready"


def test_a_next_turn_through_the_model_process_reuses_the_one_before(proc_server: LiveServer) -> None:
    """The reused prompt tokens come back through the process transport: each reply's usage says
    how many its model did not compute again, and /metrics counts them from the process's stats."""
    token = proc_server.token("dave")

    async def reply(c, sid: str, text: str) -> dict:  # noqa: ANN001 - stopped after a few frames (replies run long here)
        eid = await c.send(type="turn.create", session_id=sid, text=text, skill="chat")
        tid = (await c.until_type("turn.created", event_id=eid))["turn_id"]
        for _ in range(3):
            await c.until_type("response.delta", turn_id=tid, timeout=120)
        await c.send(type="response.cancel", session_id=sid, turn_id=tid)
        return await c.until_type("response.done", turn_id=tid)

    async def go() -> list[dict]:
        async with ws_client(proc_server, token) as c:
            sid = await c.new_session()
            return [await reply(c, sid, text) for text in ("Tell me about the sea.", "And the mountains?")]

    first, second = asyncio.run(go())
    assert first["usage"]["cached_prompt_tokens"] == 0
    assert second["usage"]["cached_prompt_tokens"] >= first["usage"]["prompt_tokens"]
    metrics = httpx.get(f"{proc_server.http}/metrics").text
    reused = float(metrics.split('assistant_chat_prompt_tokens_total{source="reused"} ')[1].split()[0])
    assert reused >= second["usage"]["cached_prompt_tokens"]


class _Out:
    """An output as the library engine gives it: every token so far."""

    def __init__(self, request_id: str, tokens: list[int], finished: bool = False) -> None:
        self.request_id, self.generated_tokens, self._finished, self.error = request_id, tokens, finished, None

    def is_finished(self) -> bool:
        return self._finished


class _Feed:
    """The pump's side of a scheduler (outputs the test puts in) and of the pipe (messages it sent)."""

    def __init__(self) -> None:
        import queue

        self.outputs: queue.Queue = queue.Queue()
        self.messages: queue.Queue = queue.Queue()
        self._manager, self.steps, self.max_concurrent_requests = self, 0, 0

    def get_result(self, timeout: float | None = None) -> _Out | None:
        import queue

        try:
            return self.outputs.get(timeout=timeout) if timeout else self.outputs.get_nowait()
        except queue.Empty:
            return None

    def kv_free_fraction(self) -> float:
        return 1.0

    def active_request_ids(self) -> set[str]:
        return set()

    def prompt_tokens(self) -> tuple[int, int]:
        return (0, 0)

    def send(self, msg: tuple) -> None:
        if msg[1]:  # messages with tokens (stats-only ones go out when idle)
            self.messages.put([(rid, new, done) for rid, new, done, _, _ in msg[1]])

    def next(self, timeout: float = 5.0) -> list[tuple]:
        return self.messages.get(timeout=timeout)


def test_the_pump_sends_first_tokens_and_ends_at_once_and_the_rest_together() -> None:
    """Each message of new tokens wakes every stream it names on the web process's event loop, so the
    model process sends them at most every ``SEND_EVERY``; a request's first tokens (its time to first
    token) and its end go at once, with whatever else is pending, and no token is lost or repeated."""
    import queue
    import threading
    from collections import deque

    from skills.chat_process import _pump

    feed, stop = _Feed(), threading.Event()
    pump = threading.Thread(target=_pump, args=(feed, feed, threading.Lock(), stop, deque()), kwargs={"every": 30.0})
    pump.start()
    try:
        feed.outputs.put(_Out("a", [1]))
        assert feed.next() == [("a", [1], False)]  # a's first token: at once
        feed.outputs.put(_Out("a", [1, 2]))
        feed.outputs.put(_Out("a", [1, 2, 3]))
        with pytest.raises(queue.Empty):
            feed.next(timeout=0.3)  # held: not a first token, not an end
        feed.outputs.put(_Out("b", [9]))
        assert sorted(feed.next()) == [("a", [2, 3], False), ("b", [9], False)]  # b's first, with a's pending
        feed.outputs.put(_Out("b", [9, 10]))
        feed.outputs.put(_Out("a", [1, 2, 3, 4], finished=True))
        assert sorted(feed.next()) == [("a", [4], True), ("b", [10], False)]  # a's end, at once
    finally:
        stop.set()
        pump.join(5)

    feed, stop = _Feed(), threading.Event()  # the usual cadence: held tokens go out within it
    pump = threading.Thread(target=_pump, args=(feed, feed, threading.Lock(), stop, deque()), kwargs={"every": 0.05})
    pump.start()
    try:
        feed.outputs.put(_Out("c", [5]))
        assert feed.next() == [("c", [5], False)]
        for n in range(6, 12):
            feed.outputs.put(_Out("c", list(range(5, n + 1))))
        got = []
        while got[-1:] != [11]:
            got += [t for _, new, _ in feed.next(timeout=2.0) for t in new]
        assert got == list(range(6, 12))
    finally:
        stop.set()
        pump.join(5)
