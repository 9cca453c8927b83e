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
