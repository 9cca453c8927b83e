"""Streamed text from many sessions is stored in shared transactions (group commit), and nothing
is lost or reordered by it: every word arrives once, in order, with gapless seqs, and the stored
reply and the event log say exactly what the client saw."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from bench.baseline import FloodSkill
from state.models import Event, Message
from tests.conftest import LiveServer, make_settings, start_server, ws_client

WORDS = 120
SESSIONS = 8


@pytest.fixture(scope="module")
def flood_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("flood")
    live = start_server(make_settings(tmp, tmp, load_models=False), skills={"chat": FloodSkill(WORDS)})
    yield live
    live.stop()


def test_concurrent_streams_share_transactions_and_lose_nothing(flood_server: LiveServer) -> None:
    token = flood_server.token("dora")
    writer = flood_server.app.state.dialogue._deltas
    batches_before = writer.batches

    async def one() -> tuple[str, list[dict]]:
        async with ws_client(flood_server, token) as c:
            sid = await c.new_session()
            _, done = await c.turn(sid, "go")
            return sid, [e for e in c.events if e.get("session_id") == sid and "seq" in e and e["seq"] is not None]

    async def all_sessions() -> list[tuple[str, list[dict]]]:
        return await asyncio.gather(*(one() for _ in range(SESSIONS)))

    results = asyncio.run(all_sessions())
    expected = "".join(f" w{i}" for i in range(WORDS))
    frames = 0
    with flood_server.app.state.sessions() as db:
        for sid, events in results:
            deltas = [e for e in events if e["type"] == "response.delta"]
            frames += len(deltas)
            assert "".join(e["delta"] for e in deltas) == expected
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seqs have gaps or are out of order"
            done = events[-1]
            assert done["type"] == "response.done" and done["status"] == "completed" and done["text"] == expected
            reply = db.scalar(select(Message).where(Message.session_id == sid, Message.role == "assistant"))
            assert reply.text == expected and reply.first_token_at is not None
            logged = db.scalars(select(Event).where(Event.session_id == sid).order_by(Event.seq)).all()
            assert [e.seq for e in logged][-len(seqs) :] == seqs
    batches = writer.batches - batches_before
    assert 0 < batches < frames, f"{frames} frames took {batches} transactions: no group commit"
