"""The garbage collector's full collections stay short: the server freezes what it loaded once its
skills are up, reports each collection's pause in /metrics, and a closed connection is freed at
once instead of waiting for a full collection."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from assistant.audio_stream import AudioStream
from assistant.ws import Connection
from tests.conftest import LiveServer, make_settings, start_server, ws_client


def gc_pauses(live: LiveServer) -> dict[str, float]:
    """Collections counted in /metrics, by generation."""
    text = httpx.get(f"{live.http}/metrics").text
    families = [f for f in text_string_to_metric_families(text) if f.name == "assistant_gc_pause_seconds"]
    return {s.labels["generation"]: s.value for f in families for s in f.samples if s.name.endswith("_count")}


def test_the_server_freezes_what_it_loaded_and_reports_each_collection(tmp_path: Path, tiny_chat_model: Path) -> None:
    assert gc.get_freeze_count() == 0
    live = start_server(make_settings(tmp_path, tiny_chat_model))
    try:
        deadline = time.monotonic() + 30
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:  # once the skills have loaded
            time.sleep(0.05)
        assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()
        before = gc_pauses(live)
        gc.collect()
        after = gc_pauses(live)
        assert after["2"] >= before["2"] + 1, (before, after)  # (another may come on its own meanwhile)
    finally:
        live.stop()
    assert gc.get_freeze_count() == 0  # a stopped server gives its objects back to the collector


def test_a_closed_connection_is_freed_without_a_garbage_collection(server: LiveServer) -> None:
    """With the collector off, a connection's objects are freed as soon as it ends (nothing in it
    refers back to itself), so full collections have less to walk and less to free."""
    token = server.token("gc")

    def alive() -> tuple[int, int]:
        objects = gc.get_objects()
        # type(), not isinstance: a weak proxy to a freed object raises on isinstance
        return sum(type(o) is Connection for o in objects), sum(type(o) is AudioStream for o in objects)

    async def connect_and_leave() -> None:
        for _ in range(4):
            async with ws_client(server, token) as c:
                await c.new_session()
                await c.send(type="ping")
                await c.until_type("pong")

    def open_connections() -> float:
        text = httpx.get(f"{server.http}/metrics").text
        gauge = next(f for f in text_string_to_metric_families(text) if f.name == "assistant_ws_connections")
        return gauge.samples[0].value

    gc.collect()
    baseline = alive()
    gc.disable()
    try:
        asyncio.run(connect_and_leave())
        deadline = time.monotonic() + 10
        while (open_connections() or alive() != baseline) and time.monotonic() < deadline:
            time.sleep(0.05)  # the endpoints finish their last lines after the clients have gone
        assert alive() == baseline
    finally:
        gc.enable()
