"""A real conversation over a real websocket: streaming, multi-turn context, persistence, resume."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.conftest import LiveServer, ws_client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_three_turns_stream_and_each_prompt_carries_the_earlier_turns(server: LiveServer) -> None:
    token = server.token("alice")
    worker = server.app.state.skills["chat"].worker

    async def go() -> tuple[str, list[dict], list[dict]]:
        async with ws_client(server, token) as c:
            assert c.hello["type"] == "server.hello" and c.hello["protocol_version"] == "1.1"
            assert {"name": "chat", "ready": True, "state": "ready"} in c.hello["skills"]
            sid = await c.new_session()
            dones, prompts = [], []
            for text in ("My name is Ada.", "I like green tea.", "What is my name?"):
                tid, done = await c.turn(sid, text)
                dones.append(done)
                prompts.append(next(p for rid, p in worker.recent_prompts if rid.startswith(tid)))
                turn_events = [e for e in c.events if e.get("turn_id") == tid]
                kinds = [e["type"] for e in turn_events]
                assert kinds[:2] == ["turn.created", "turn.routed"] and kinds[-1] == "response.done"
                assert kinds.count("response.delta") >= 2, "the reply must stream in several frames"
                deltas = "".join(e["delta"] for e in turn_events if e["type"] == "response.delta")
                assert deltas == done["text"] and done["status"] == "completed"
                routed = turn_events[1]
                assert routed["skill"] == "chat" and routed["reason"] and 0 < routed["confidence"] <= 1
            seqs = [e["seq"] for e in c.events if "seq" in e]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            return sid, dones, prompts

    sid, dones, prompts = asyncio.run(go())
    assert "My name is Ada." in prompts[0] and "I like green tea." not in prompts[0]
    # The second prompt holds the first exchange, model reply included; the third holds both.
    assert prompts[1].index("My name is Ada.") < prompts[1].index(dones[0]["text"]) < prompts[1].index("I like green tea.")
    for earlier in ("My name is Ada.", dones[0]["text"], "I like green tea.", dones[1]["text"]):
        assert earlier in prompts[2]
    assert prompts[2].rstrip().endswith("What is my name?<|im_end|>\n<|im_start|>assistant")
    assert all(d["usage"]["completion_tokens"] > 0 and d["usage"]["prompt_tokens"] > 0 for d in dones)
    assert dones[2]["usage"]["prompt_tokens"] > dones[1]["usage"]["prompt_tokens"] > dones[0]["usage"]["prompt_tokens"]

    history = httpx.get(f"{server.http}/v1/sessions/{sid}/messages", headers=auth(token)).json()
    msgs = history["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert [m["text"] for m in msgs[1::2]] == [d["text"] for d in dones]
    assert all(m["status"] == "completed" and m["skill"] == "chat" for m in msgs[1::2])
    assert all(m["first_token_at"] and m["finished_at"] for m in msgs[1::2])
    assert history["session"]["title"] == "My name is Ada."


def test_resume_replays_what_was_missed_an_ended_reply_as_its_done(server: LiveServer) -> None:
    token = server.token("alice")

    async def go() -> None:
        async with ws_client(server, token) as c:
            sid = await c.new_session()
            await c.turn(sid, "first")
            cut = max(e["seq"] for e in c.events if "seq" in e)
            await c.turn(sid, "second")
            live = [e for e in c.events if e.get("seq", 0) > cut]
        async with ws_client(server, token) as c2:
            await c2.send(type="session.resume", session_id=sid, last_seq=cut)
            resumed = await c2.until_type("session.resumed")
            replayed = [e for e in c2.events if "seq" in e]
            # the second reply has ended: its response.done carries the whole text, its deltas are not resent
            assert replayed == [e for e in live if e["type"] != "response.delta"]
            assert [e["type"] for e in replayed] == ["turn.created", "turn.routed", "response.done"]
            assert replayed[-1]["text"] == "".join(e["delta"] for e in live if e["type"] == "response.delta")
            assert resumed["last_seq"] == live[-1]["seq"] and resumed["replayed"] == len(replayed)
            # After the replay the connection follows the session live.
            _, done = await c2.turn(sid, "third")
            assert done["seq"] > resumed["last_seq"]

    asyncio.run(go())


def test_a_batched_resume_sends_the_same_events_in_session_replay_frames(server: LiveServer) -> None:
    from assistant import protocol as p

    token = server.token("alice")

    async def go() -> tuple[str, list[dict]]:
        async with ws_client(server, token) as c:
            sid = await c.new_session()
            for text in ("first", "second", "third"):
                await c.turn(sid, text)
        async with ws_client(server, token) as plain, ws_client(server, token) as batched:
            await plain.send(type="session.resume", session_id=sid, last_seq=0)
            want_resumed = await plain.until_type("session.resumed")
            await batched.send(type="session.resume", session_id=sid, last_seq=0, batch=True)
            resumed = await batched.until_type("session.resumed")
            want = [e for e in plain.events if "seq" in e]
            assert [e["type"] for e in batched.events[1:]] == ["session.replay", "session.resumed"]
            replay = batched.events[1]
            assert replay["session_id"] == sid and "seq" not in replay and replay["events"] == want
            assert {**resumed, "event_id": None} == {**want_resumed, "event_id": None} and resumed["replayed"] == len(want)
            # After the replay the connection follows the session live, as after a plain resume.
            _, done = await batched.turn(sid, "fourth")
            assert done["seq"] > resumed["last_seq"]
            return sid, want

    sid, want = asyncio.run(go())
    # Larger replays are split: frames of at most max_chars characters of events, a longer event alone.
    frames = [json.dumps(e, separators=(",", ":")) for e in want]
    limit = max(len(f) for f in frames) - 1
    parts = [json.loads(f)["events"] for f in p.replay_frames(sid, frames, max_chars=limit)]
    assert [e for part in parts for e in part] == want and len(parts) > 1
    sizes = iter(len(f) + 1 for f in frames)
    chunks = [[next(sizes) for _ in part] for part in parts]
    assert all(len(c) == 1 or sum(c) <= limit for c in chunks)
    assert any(len(c) == 1 and c[0] > limit for c in chunks), "the longest event came alone"


def test_two_tabs_on_one_session_both_see_the_stream(server: LiveServer) -> None:
    token = server.token("alice")

    async def go() -> None:
        async with ws_client(server, token) as a, ws_client(server, token) as b:
            sid = await a.new_session()
            await b.send(type="session.resume", session_id=sid, last_seq=0)
            await b.until_type("session.resumed")
            tid, done = await a.turn(sid, "hello")
            seen = await b.until_type("response.done", turn_id=tid)
            assert seen == done

    asyncio.run(go())


def test_rest_lists_renames_and_deletes_sessions(server: LiveServer) -> None:
    token = server.token("carol")
    h = auth(token)
    first = httpx.post(f"{server.http}/v1/sessions", headers=h, json={"title": "first"}).json()
    second = httpx.post(f"{server.http}/v1/sessions", headers=h, json={}).json()
    listed = httpx.get(f"{server.http}/v1/sessions", headers=h).json()["sessions"]
    assert [s["id"] for s in listed] == [second["id"], first["id"]]  # newest first
    renamed = httpx.patch(f"{server.http}/v1/sessions/{first['id']}", headers=h, json={"title": "Trip plans"})
    assert renamed.status_code == 200 and renamed.json()["title"] == "Trip plans"
    assert httpx.patch(f"{server.http}/v1/sessions/{first['id']}", headers=h, json={"title": ""}).status_code == 422
    assert httpx.delete(f"{server.http}/v1/sessions/{second['id']}", headers=h).status_code == 204
    listed = httpx.get(f"{server.http}/v1/sessions", headers=h).json()["sessions"]
    assert [(s["id"], s["title"]) for s in listed] == [(first["id"], "Trip plans")]
    assert httpx.get(f"{server.http}/v1/sessions/{second['id']}/messages", headers=h).status_code == 404


def test_a_long_history_reads_in_pages_newest_first(server: LiveServer) -> None:
    token = server.token("dora")

    async def talk() -> str:
        async with ws_client(server, token) as c:
            sid = await c.new_session()
            for k in range(4):
                await c.turn(sid, f"question {k}")
            return sid

    sid = asyncio.run(talk())
    url, h = f"{server.http}/v1/sessions/{sid}/messages", auth(token)
    whole = httpx.get(url, headers=h).json()
    assert [m["position"] for m in whole["messages"]] == list(range(8)) and whole["has_more"] is False
    pages, before = [], None
    while True:
        page = httpx.get(url, headers=h, params={"limit": 3, **({"before": before} if before is not None else {})}).json()
        pages.append([m["position"] for m in page["messages"]])
        if not page["has_more"]:
            break
        before = page["messages"][0]["position"]
    assert pages == [[5, 6, 7], [2, 3, 4], [0, 1]]
    assert [m for page in reversed(pages) for m in page] == list(range(8))
    newest = httpx.get(url, headers=h, params={"limit": 2}).json()["messages"]
    assert newest == whole["messages"][-2:] and newest[0]["text"] == "question 3"
    for bad in ({"limit": 0}, {"limit": 1001}, {"before": -1}, {"limit": "x"}):
        assert httpx.get(url, headers=h, params=bad).status_code == 422, bad


def test_health_metrics_docs_and_page(server: LiveServer) -> None:
    health = httpx.get(f"{server.http}/healthz").json()
    assert health["status"] == "ok" and health["skills"]["chat"]["ready"] is True
    metrics = httpx.get(f"{server.http}/metrics").text
    assert 'assistant_skill_ready{skill="chat"} 1.0' in metrics
    assert "assistant_turns_total" in metrics and "assistant_time_to_first_token_seconds_bucket" in metrics
    doc = httpx.get(f"{server.http}/asyncapi.json").json()
    assert doc["asyncapi"].startswith("3.") and doc["channels"]["session"]["address"] == "/v1/ws"
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert {"session.create", "session.resume", "turn.create", "response.cancel", "server.hello", "turn.routed",
            "response.delta", "response.done", "error"} <= names
    assert "ErrorCode" in doc["components"]["schemas"]
    openapi = httpx.get(f"{server.http}/openapi.json").json()
    assert "/v1/sessions/{session_id}/messages" in openapi["paths"]
    page = httpx.get(f"{server.http}/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_the_server_declines_websocket_compression(server: LiveServer) -> None:
    """A client offering permessage-deflate (as browsers and ``websockets`` do) gets plain frames:
    each connection then holds no zlib context (idle-session memory, frames per second)."""

    async def go() -> tuple[str | None, str | None, list, dict]:
        async with ws_client(server, server.token("alice")) as c:
            offered = c.ws.request.headers.get("Sec-WebSocket-Extensions")
            accepted = c.ws.response.headers.get("Sec-WebSocket-Extensions")
            await c.send(type="ping")
            return offered, accepted, c.ws.protocol.extensions, await c.until_type("pong")

    offered, accepted, extensions, pong = asyncio.run(go())
    assert offered and "permessage-deflate" in offered
    assert accepted is None and extensions == []
    assert pong["type"] == "pong"


def test_metrics_say_where_the_time_to_first_token_went(server: LiveServer) -> None:
    """/metrics splits each chat turn's time to its first frame into stages (admit, start, model,
    send); the first three add up to the time-to-first-token metric itself."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, str], float]:
        out = {}
        for fam in text_string_to_metric_families(httpx.get(f"{server.http}/metrics").text):
            for s in fam.samples:
                if s.name.endswith(("_sum", "_count")) and s.labels.get("skill") == "chat":
                    out[(s.name, s.labels.get("stage", ""))] = s.value
        return out

    async def go() -> None:
        async with ws_client(server, server.token("metra")) as c:
            sid = await c.new_session()
            for text in ("hello there", "and again"):
                _, done = await c.turn(sid, text)
                assert done["status"] == "completed" and done["text"]

    before = scrape()
    asyncio.run(go())
    after = scrape()
    grew = {key: after[key] - before.get(key, 0.0) for key in after}
    stage = "assistant_ttft_stage_seconds"
    assert {grew[(f"{stage}_count", s)] for s in ("admit", "start", "model", "send")} == {2.0}
    assert all(grew[(f"{stage}_sum", s)] > 0 for s in ("admit", "start", "model", "send"))
    parts = sum(grew[(f"{stage}_sum", s)] for s in ("admit", "start", "model"))
    assert parts == pytest.approx(grew[("assistant_time_to_first_token_seconds_sum", "")], rel=1e-6)
