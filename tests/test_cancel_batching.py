"""Long generations: concurrent sessions share the model's batches, and cancel really stops the work,
with the model in the web process (thread) and in a child process (process), on both batching
engines (the slot engine and transformers' continuous batching)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, start_server, ws_client

MAX_NEW = 3000


@pytest.fixture(
    scope="module",
    params=[("thread", "slots"), ("process", "slots"), ("thread", "library"), ("process", "library")],
    ids=lambda p: "-".join(p),
)
def long_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path
) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("long"),
        tiny_chat_model,
        chat_max_new_tokens=MAX_NEW,
        chat_kv_blocks=256,
        chat_worker=request.param[0],
        chat_engine=request.param[1],
    )
    live = start_server(settings)
    health = httpx.get(f"{live.http}/healthz").json()
    assert health["skills"]["chat"]["engine"] == request.param[1]
    yield live
    live.stop()


def wait_until(pred, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_cancel_mid_stream_stops_the_worker_and_frees_the_cache(long_server: LiveServer) -> None:
    token = long_server.token("alice")
    worker = long_server.app.state.skills["chat"].worker

    async def go() -> tuple[dict, float]:
        async with ws_client(long_server, token) as c:
            sid = await c.new_session()
            eid = await c.send(type="turn.create", session_id=sid, text="tell me a very long story")
            tid = (await c.until_type("turn.created", event_id=eid))["turn_id"]
            for _ in range(5):
                await c.until_type("response.delta", turn_id=tid)
            busy_free = worker.kv_free_fraction()
            if long_server.settings.chat_engine == "library":
                # The library keeps a request's full pages as a prefix cache: cancel just after the reply
                # took a new page, which holds a token or two, so freeing it shows (a cancel that lands on
                # a page boundary frees nothing the cache would not keep).
                for _ in range(200):
                    await c.until_type("response.delta", turn_id=tid)
                    if worker.kv_free_fraction() < busy_free:
                        break
                busy_free = worker.kv_free_fraction()
            assert any(r.startswith(tid) for r in worker.active_request_ids())
            await c.send(type="response.cancel", session_id=sid, turn_id=tid)
            done = await c.until_type("response.done", turn_id=tid)
            # Nothing more arrives for this turn after its done.
            with pytest.raises(TimeoutError):
                await c.until(lambda e: e.get("turn_id") == tid, timeout=0.5)
            return done, busy_free

    done, busy_free = asyncio.run(go())
    assert done["status"] == "cancelled"
    assert 0 < done["usage"]["completion_tokens"] < MAX_NEW and done["text"]
    assert wait_until(lambda: not worker.active_request_ids()), "the scheduler still holds the cancelled request"
    assert wait_until(lambda: worker.kv_free_fraction() > busy_free), "cancel did not free KV-cache pages"
    steps = worker.steps
    time.sleep(0.3)
    assert worker.steps == steps, "the model kept running after the cancel"


def test_two_sessions_are_decoded_in_the_same_batches(long_server: LiveServer) -> None:
    token = long_server.token("bob")
    worker = long_server.app.state.skills["chat"].worker
    worker.max_concurrent_requests = 0

    async def go() -> list[tuple[str, float]]:
        async with ws_client(long_server, token) as a, ws_client(long_server, token) as b:
            sa, sb = await a.new_session(), await b.new_session()
            arrivals: list[tuple[str, float]] = []

            async def stream(c, sid: str, name: str) -> None:  # noqa: ANN001
                eid = await c.send(type="turn.create", session_id=sid, text=f"story for {name}")
                tid = (await c.until_type("turn.created", event_id=eid))["turn_id"]
                for _ in range(20):
                    await c.until_type("response.delta", turn_id=tid)
                    arrivals.append((name, time.monotonic()))
                await c.send(type="response.cancel", session_id=sid, turn_id=tid)
                assert (await c.until_type("response.done", turn_id=tid))["status"] == "cancelled"

            await asyncio.gather(stream(a, sa, "a"), stream(b, sb, "b"))
            return arrivals

    arrivals = asyncio.run(go())
    assert worker.max_concurrent_requests >= 2, "the two requests never shared a forward pass"
    # The streams interleave: both sessions receive text while the other is still streaming.
    order = [name for name, _ in sorted(arrivals, key=lambda x: x[1])]
    first_a, last_a = order.index("a"), len(order) - 1 - order[::-1].index("a")
    assert "b" in order[first_a:last_a]
    assert wait_until(lambda: not worker.active_request_ids())
