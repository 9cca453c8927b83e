"""Bad input over the websocket: every fault gets a typed ``error`` with its stable code (and the
client's ``event_id`` where one could be read), nothing half-written is stored, and the connection
stays usable. Also the per-session turn queue: queueing, the queue limit, and cancelling a queued turn."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from state import store
from state.models import Message
from tests.conftest import Client, LiveServer, ws_client

# ----------------------------------------------------------------------------- helpers


def stored_messages(server: LiveServer, session_id: str) -> list[tuple[str, str, str]]:
    """The session's messages as (role, status, text), oldest first, read straight from the DB."""
    with server.app.state.sessions() as db:
        return [(m.role, m.status, m.text) for m in store.history(db, session_id=session_id)]


def message_rows(server: LiveServer) -> int:
    """Rows in the whole messages table."""
    with server.app.state.sessions() as db:
        return db.scalar(select(func.count()).select_from(Message)) or 0


async def assert_usable(client: Client) -> None:
    """The connection still answers: the very next event after a ping is its pong."""
    await client.send(type="ping", event_id="p")
    assert await client.recv() == {"type": "pong", "event_id": "p"}


async def send_frame(client: Client, frame: str | bytes | dict) -> None:
    """Send a raw text/binary frame, or a dict as JSON exactly as given (no event_id added)."""
    await client.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)


async def expect_rejected(
    server: LiveServer, client: Client, frame: str | bytes | dict, code: str, event_id: str | None
) -> dict:
    """Send ``frame``; the very next event must be an error with ``code`` and ``event_id`` (absent
    when None). Asserts no message row was written and the connection still works."""
    rows = message_rows(server)
    await send_frame(client, frame)
    err = await client.recv()
    assert err["type"] == "error", err
    assert err["code"] == code, err
    assert err.get("event_id") == event_id, err
    assert err["message"], "an error carries a human-readable message"
    await assert_usable(client)
    assert message_rows(server) == rows, "a refused event must not store anything"
    return err


async def session_with_one_turn(client: Client) -> str:
    """A session holding one finished turn, so 'unchanged' is checked against real history."""
    sid = await client.new_session()
    _, done = await client.turn(sid, "hello")
    assert done["status"] == "completed", done
    return sid


async def send_turns(client: Client, session_id: str, n: int) -> list[str]:
    """``n`` turn.create frames back-to-back, not waiting for any reply in between."""
    return [await client.send(type="turn.create", session_id=session_id, text=f"turn {i}") for i in range(n)]


def reply_to(event_id: str) -> Callable[[dict], bool]:
    return lambda e: e.get("event_id") == event_id and e["type"] in ("turn.created", "error")


def index_of(events: list[dict], **match: object) -> int:
    return next(i for i, e in enumerate(events) if all(e.get(k) == v for k, v in match.items()))


def completed_turns(n: int) -> list[tuple[str, str]]:
    """What ``n`` finished turns look like in the DB, as (role, status) pairs."""
    return [("user", "completed"), ("assistant", "completed")] * n


async def replies(client: Client, event_ids: list[str]) -> list[dict]:
    """The turn.created or error answering each event id, in order."""
    return [await client.until(reply_to(eid)) for eid in event_ids]


async def wait_done(client: Client, turn_ids: list[str]) -> list[dict]:
    """The response.done of each turn, whether it already arrived or is still to come."""
    out = []
    for turn_id in turn_ids:
        seen = [e for e in client.events if e["type"] == "response.done" and e.get("turn_id") == turn_id]
        out.append(seen[0] if seen else await client.until_type("response.done", turn_id=turn_id, timeout=60))
    return out


@pytest.fixture(scope="module")
def alice(server: LiveServer) -> str:
    return server.token("alice")


@pytest.fixture(scope="module")
def bob(server: LiveServer) -> str:
    return server.token("bob")


# ----------------------------------------------------------------------------- malformed frames

# (frame built from the session id, expected code, expected echoed event_id or None for "absent")
FRAME_CASES: dict[str, tuple[Callable[[str], str | bytes | dict], str, str | None]] = {
    "malformed_json": (lambda sid: "{not json", "malformed_json", None),
    "binary_frame": (lambda sid: b"\x00\x01", "binary_not_expected", None),
    "json_array": (lambda sid: json.dumps([{"type": "ping", "event_id": "a1"}]), "invalid_event", None),
    "unknown_type": (lambda sid: {"type": "turn.explode", "event_id": "u1"}, "unknown_event", "u1"),
    "missing_type": (lambda sid: {"event_id": "u2"}, "unknown_event", "u2"),
    "missing_session_id": (lambda sid: {"type": "turn.create", "event_id": "m1", "text": "hi"}, "invalid_event", "m1"),
    "text_not_a_string": (
        lambda sid: {"type": "turn.create", "event_id": "w1", "session_id": sid, "text": 123},
        "invalid_event",
        "w1",
    ),
    "last_seq_not_an_int": (
        lambda sid: {"type": "session.resume", "event_id": "w2", "session_id": sid, "last_seq": "x"},
        "invalid_event",
        "w2",
    ),
    "unknown_field": (
        lambda sid: {"type": "turn.create", "event_id": "w3", "session_id": sid, "text": "hi", "colour": "red"},
        "invalid_event",
        "w3",
    ),
    # Over max_frame_bytes (65536): refused before it is parsed, so no event_id is read from it.
    "frame_too_large": (
        lambda sid: {"type": "turn.create", "event_id": "big", "session_id": sid, "text": "a" * 70_000},
        "frame_too_large",
        None,
    ),
    # Over max_text_chars (16000) yet under the frame limit.
    "text_too_long": (
        lambda sid: {"type": "turn.create", "event_id": "t1", "session_id": sid, "text": "a" * 20_000},
        "text_too_long",
        "t1",
    ),
    "empty_text": (
        lambda sid: {"type": "turn.create", "event_id": "t2", "session_id": sid, "text": ""},
        "empty_turn",
        "t2",
    ),
    "blank_text": (
        lambda sid: {"type": "turn.create", "event_id": "t3", "session_id": sid, "text": " \n\t "},
        "empty_turn",
        "t3",
    ),
    "no_such_session": (
        lambda sid: {"type": "turn.create", "event_id": "s1", "session_id": "0" * 32, "text": "hi"},
        "session_not_found",
        "s1",
    ),
    "resume_no_such_session": (
        lambda sid: {"type": "session.resume", "event_id": "s2", "session_id": "0" * 32},
        "session_not_found",
        "s2",
    ),
    "unknown_skill": (
        lambda sid: {"type": "turn.create", "event_id": "k1", "session_id": sid, "text": "hi", "skill": "nope"},
        "skill_unknown",
        "k1",
    ),
    "cancel_unknown_turn": (
        lambda sid: {"type": "response.cancel", "event_id": "c1", "session_id": sid, "turn_id": "0" * 32},
        "turn_not_found",
        "c1",
    ),
}


@pytest.mark.parametrize("case", list(FRAME_CASES))
def test_bad_frame_is_refused_with_typed_error(server: LiveServer, alice: str, case: str) -> None:
    build, code, event_id = FRAME_CASES[case]

    async def scenario() -> None:
        async with ws_client(server, alice) as client:
            sid = await session_with_one_turn(client)
            before = stored_messages(server, sid)
            await expect_rejected(server, client, build(sid), code, event_id)
            assert stored_messages(server, sid) == before
            # Still usable for real work, not only pings.
            _, done = await client.turn(sid, "still there?")
            assert done["status"] == "completed", done

    asyncio.run(scenario())


def test_many_bad_frames_in_a_row_keep_the_connection(server: LiveServer, alice: str) -> None:
    async def scenario() -> None:
        async with ws_client(server, alice) as client:
            sid = await client.new_session()
            for build, code, event_id in FRAME_CASES.values():
                await expect_rejected(server, client, build(sid), code, event_id)
            assert stored_messages(server, sid) == []

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- another user's session


def test_turn_on_another_users_session_is_not_found(server: LiveServer, alice: str, bob: str) -> None:
    async def scenario() -> None:
        async with ws_client(server, bob) as bob_ws, ws_client(server, alice) as alice_ws:
            bobs = await session_with_one_turn(bob_ws)
            before = stored_messages(server, bobs)
            frame = {"type": "turn.create", "event_id": "x1", "session_id": bobs, "text": "let me in"}
            await expect_rejected(server, alice_ws, frame, "session_not_found", "x1")
            assert stored_messages(server, bobs) == before
            # Bob saw nothing of the attempt: his next event is the pong to his own ping.
            await assert_usable(bob_ws)

    asyncio.run(scenario())


def test_resume_of_another_users_session_is_not_found_and_not_watched(
    server: LiveServer, alice: str, bob: str
) -> None:
    async def scenario() -> None:
        async with ws_client(server, bob) as bob_ws, ws_client(server, alice) as alice_ws:
            bobs = await session_with_one_turn(bob_ws)
            frame = {"type": "session.resume", "event_id": "r1", "session_id": bobs, "last_seq": 0}
            await expect_rejected(server, alice_ws, frame, "session_not_found", "r1")
            # Neither the replay nor bob's live turn reaches alice.
            _, done = await bob_ws.turn(bobs, "private")
            assert done["status"] == "completed", done
            await assert_usable(alice_ws)

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- the turn queue


def test_second_turn_waits_in_the_queue_and_runs_after_the_first(server: LiveServer, alice: str) -> None:
    async def scenario() -> None:
        async with ws_client(server, alice) as client:
            sid = await client.new_session()
            first, second = await replies(client, await send_turns(client, sid, 2))
            assert first["type"] == second["type"] == "turn.created", (first, second)
            t1, t2 = first["turn_id"], second["turn_id"]
            done1, done2 = await wait_done(client, [t1, t2])
            assert done1["status"] == done2["status"] == "completed", (done1, done2)

            events = client.events
            queued_at = index_of(events, type="turn.queued", turn_id=t2)
            assert queued_at == index_of(events, type="turn.created", turn_id=t2) + 1, "queued right after created"
            assert events[queued_at]["position"] == 1, "next in line, even before the first turn started"
            assert not [e for e in events if e["type"] == "turn.queued" and e["turn_id"] == t1], "t1 never waited"
            done1_at = index_of(events, type="response.done", turn_id=t1)
            assert done1_at < index_of(events, type="turn.routed", turn_id=t2), "t2 starts only after t1 is done"
            assert done1_at < index_of(events, type="response.done", turn_id=t2)
            assert [(r, s) for r, s, _ in stored_messages(server, sid)] == completed_turns(2)
            await assert_usable(client)

    asyncio.run(scenario())


def test_queue_positions_and_limit_while_a_turn_runs(server: LiveServer, alice: str) -> None:
    """With the first turn visibly running, ``max_queued_turns`` more may wait (positions 1..N), in
    order; the next is refused with turn_queue_full and leaves nothing stored."""
    limit = server.settings.max_queued_turns

    async def scenario() -> None:
        async with ws_client(server, alice) as client:
            sid = await client.new_session()
            (first,) = await replies(client, await send_turns(client, sid, 1))
            await client.until_type("turn.routed", turn_id=first["turn_id"])
            waiting = await replies(client, await send_turns(client, sid, limit + 1))
            *accepted, refused = waiting
            assert [r["type"] for r in accepted] == ["turn.created"] * limit, waiting
            assert refused["type"] == "error" and refused["code"] == "turn_queue_full", refused
            assert refused["session_id"] == sid
            turn_ids = [r["turn_id"] for r in accepted]
            queued = [client.events[index_of(client.events, type="turn.queued", turn_id=t)] for t in turn_ids]
            assert [q["position"] for q in queued] == list(range(1, limit + 1)), queued
            dones = await wait_done(client, [first["turn_id"], *turn_ids])
            assert [d["status"] for d in dones] == ["completed"] * (limit + 1), dones
            order = [index_of(client.events, type="response.done", turn_id=d["turn_id"]) for d in dones]
            assert order == sorted(order), "queued turns finish in the order they were sent"
            assert [(r, s) for r, s, _ in stored_messages(server, sid)] == completed_turns(limit + 1)
            await assert_usable(client)

    asyncio.run(scenario())


def test_too_many_back_to_back_turns_are_refused(server: LiveServer, alice: str) -> None:
    limit = server.settings.max_queued_turns

    async def scenario() -> None:
        async with ws_client(server, alice) as client:
            sid = await client.new_session()
            eids = await send_turns(client, sid, limit + 2)
            answers = await replies(client, eids)
            refused = [r for r in answers if r["type"] == "error"]
            accepted = [r["turn_id"] for r in answers if r["type"] == "turn.created"]
            assert refused, f"{limit + 2} back-to-back turns must overflow a queue of {limit}"
            assert all(r["code"] == "turn_queue_full" and r["session_id"] == sid for r in refused), refused
            assert answers[0]["type"] == "turn.created", "the first turn is never refused"
            dones = await wait_done(client, accepted)
            assert [d["status"] for d in dones] == ["completed"] * len(accepted), dones
            # Only the accepted turns were stored: a user and an assistant message each.
            assert [(r, s) for r, s, _ in stored_messages(server, sid)] == completed_turns(len(accepted))
            await assert_usable(client)

    asyncio.run(scenario())


def test_cancelling_a_queued_turn(server: LiveServer, alice: str) -> None:
    async def scenario() -> None:
        async with ws_client(server, alice) as client:
            sid = await client.new_session()
            first, second = await replies(client, await send_turns(client, sid, 2))
            t1, t2 = first["turn_id"], second["turn_id"]
            await client.send(type="response.cancel", session_id=sid, turn_id=t2)
            done2, done1 = await wait_done(client, [t2, t1])
            assert done2["status"] == "cancelled", done2
            assert done2["text"] == ""
            assert done1["status"] == "completed", done1
            assert not [e for e in client.events if e["type"] == "error"], client.events
            assert not [e for e in client.events if e.get("turn_id") == t2 and e["type"] == "turn.routed"], "never ran"
            assert [(r, s) for r, s, _ in stored_messages(server, sid)] == [
                *completed_turns(1),
                ("user", "completed"),
                ("assistant", "cancelled"),
            ]
            # The cancelled turn is gone from the queue: cancelling it again is turn_not_found.
            frame = {"type": "response.cancel", "event_id": "c2", "session_id": sid, "turn_id": t2}
            await expect_rejected(server, client, frame, "turn_not_found", "c2")

    asyncio.run(scenario())
