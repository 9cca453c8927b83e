"""Speaking to the assistant over a real server: PCM16 frames over the websocket or a file upload
become a transcript and a turn that is routed and answered like a typed one; review mode returns
the transcript only; every bad input gets its typed error and stores nothing."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from assistant.audio import decode_file
from state import db as state_db
from state.attachments import session_attachments
from tests.conftest import LiveServer, make_settings, start_server, ws_client
from tests.speech_fixtures import FORMATS, MIME

FRAME = 3200  # 100 ms of PCM16 at 16 kHz


def speech_settings(tmp: Path, chat: Path, whisper: Path, **overrides: object):  # noqa: ANN201
    return make_settings(
        tmp, chat, speech_model=str(whisper), speech_device="cpu", speech_max_tokens=6,
        speech_partial_seconds=0.5, audio_max_seconds=8, audio_max_bytes=2_000_000, **overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_chat_model, tiny_whisper) -> Iterator[LiveServer]:  # noqa: ANN001
    srv = start_server(speech_settings(tmp_path_factory.mktemp("speech-srv"), tiny_chat_model, tiny_whisper))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pcm(speech_files) -> bytes:  # noqa: ANN001
    samples = decode_file(speech_files["wav"].read_bytes())
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def stored(live: LiveServer, session_id: str) -> tuple[list, list]:
    """(messages, audio attachments) the server kept for the session."""
    with state_db.make_session_factory(live.app.state.engine)() as db:  # type: ignore[attr-defined]
        atts = [(a.id, a.sha256, a.kind, a.mime_type, dict(a.meta)) for a in session_attachments(db, session_id=session_id)]
    token = live.token()
    msgs = httpx.get(f"{live.http}/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {token}"})
    return msgs.json()["messages"], atts


def blob_count(live: LiveServer) -> int:
    root = live.settings.data_dir / "blobs"
    return sum(1 for p in root.rglob("*") if p.is_file()) if root.exists() else 0


async def stream(client, session_id: str, pcm: bytes, *, review: bool = False, wait_partial: bool = False) -> str:  # noqa: ANN001
    eid = await client.send(type="audio.start", session_id=session_id, format="pcm16", sample_rate=16000, review=review)
    started = await client.until(lambda e: e.get("event_id") == eid)
    assert started["type"] == "audio.started" and started["max_seconds"] == 8, started
    for i in range(0, len(pcm), FRAME):
        await client.ws.send(pcm[i : i + FRAME])
    if wait_partial:
        partial = await client.until_type("transcript.partial", session_id=session_id)
        assert partial["text"] and "seq" not in partial
    return await client.send(type="audio.commit", session_id=session_id)


def test_spoken_turn_is_transcribed_routed_and_answered(live: LiveServer, pcm: bytes) -> None:
    async def scenario() -> tuple[str, dict, list[dict]]:
        async with ws_client(live, live.token()) as c:
            assert {"name": "speech", "ready": True, "state": "ready"}.items() <= next(
                s for s in c.hello["skills"] if s["name"] == "speech"
            ).items()
            sid = await c.new_session()
            eid = await stream(c, sid, pcm, wait_partial=True)
            final = await c.until(lambda e: e.get("event_id") == eid)
            assert final["type"] == "transcript.final", final
            created = await c.until_type("turn.created", turn_id=final["turn_id"])
            routed = await c.until_type("turn.routed", turn_id=final["turn_id"])
            done = await c.until_type("response.done", turn_id=final["turn_id"], timeout=60)
            assert created["input"] == "speech" and created["text"] == final["text"] and created["event_id"] == eid
            assert created["seq"] == final["seq"] + 1
            assert routed["skill"] == "chat" and done["status"] == "completed" and done["text"]
        # A client that resumes sees the transcript (logged), not the partials.
        async with ws_client(live, live.token()) as c2:
            await c2.send(type="session.resume", session_id=sid, last_seq=0)
            await c2.until_type("session.resumed")
            replayed = [e["type"] for e in c2.events]
        return sid, final, replayed

    sid, final, replayed = run(scenario())
    assert final["review"] is False and abs(final["duration_ms"] - len(pcm) / 32) < 1
    assert "transcript.partial" not in replayed
    assert replayed.index("transcript.final") + 1 == replayed.index("turn.created")
    msgs, atts = stored(live, sid)
    assert [(m["role"], m["input"]) for m in msgs] == [("user", "speech"), ("assistant", "text")]
    assert msgs[0]["text"] == final["text"] and msgs[1]["status"] == "completed"
    ((att_id, sha, kind, mime, meta),) = atts
    assert att_id == final["attachment_id"] and kind == "audio" and mime == "audio/wav"
    assert meta["turn_id"] == final["turn_id"] and meta["transcript"] == final["text"]
    kept = live.app.state.blobs.read(sha)  # type: ignore[attr-defined]
    assert hashlib.sha256(kept).hexdigest() == sha and decode_file(kept).size == len(pcm) // 2


def test_review_mode_returns_the_transcript_then_the_edited_text_is_sent(live: LiveServer, pcm: bytes) -> None:
    async def scenario() -> tuple[str, dict, dict]:
        async with ws_client(live, live.token()) as c:
            sid = await c.new_session()
            eid = await stream(c, sid, pcm, review=True)
            final = await c.until(lambda e: e.get("event_id") == eid)
            assert final["type"] == "transcript.final" and final["review"] is True and "turn_id" not in final
            edited = final["text"][:20] + " fixed"
            _, done = await c.turn(sid, edited)
            created = next(e for e in c.events if e["type"] == "turn.created")
            assert not any(e["type"] == "turn.created" and e.get("input") == "speech" for e in c.events)
            return sid, created, done

    sid, created, done = run(scenario())
    assert created["input"] == "text" and created["text"].endswith(" fixed") and done["status"] == "completed"
    msgs, _ = stored(live, sid)
    assert [m["input"] for m in msgs if m["role"] == "user"] == ["text"]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_uploaded_file_becomes_a_turn(live: LiveServer, speech_files, fmt: str) -> None:  # noqa: ANN001
    token = live.token()
    data = speech_files[fmt].read_bytes()

    async def scenario() -> tuple[dict, dict]:
        async with ws_client(live, token) as c:
            sid = await c.new_session()
            async with httpx.AsyncClient(timeout=60) as http:
                r = await http.post(
                    f"{live.http}/v1/sessions/{sid}/audio",
                    headers={"Authorization": f"Bearer {token}"},
                    files={"file": (f"clip.{fmt}", data, MIME[fmt])},
                )
            assert r.status_code == 200, r.text
            body = r.json()
            # The reply streams to the session's websocket subscribers.
            done = await c.until_type("response.done", turn_id=body["turn_id"], timeout=60)
            return body | {"session_id": sid}, done

    body, done = run(scenario())
    assert body["text"] and done["status"] == "completed"
    assert abs(body["duration_ms"] - 1415) < 100  # espeak-ng's sentence, whatever the container
    msgs, atts = stored(live, body["session_id"])
    assert msgs[0]["input"] == "speech" and msgs[0]["text"] == body["text"]
    ((att_id, sha, kind, mime, _),) = atts
    assert (att_id, kind, mime) == (body["attachment_id"], "audio", MIME[fmt])
    assert live.app.state.blobs.read(sha) == data  # type: ignore[attr-defined]


def test_upload_in_review_mode_creates_no_turn(live: LiveServer, speech_files) -> None:  # noqa: ANN001
    token = live.token()
    sid = httpx.post(f"{live.http}/v1/sessions", headers={"Authorization": f"Bearer {token}"}, json={}).json()["id"]
    r = httpx.post(
        f"{live.http}/v1/sessions/{sid}/audio?review=true", headers={"Authorization": f"Bearer {token}"},
        files={"file": ("a.ogg", speech_files["ogg"].read_bytes(), "audio/ogg")}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200 and r.json()["review"] is True and "turn_id" not in r.json() and r.json()["text"]
    assert stored(live, sid)[0] == []


def test_deleting_a_session_deletes_its_audio_unless_another_session_has_the_same_bytes(
    live: LiveServer, speech_files  # noqa: ANN001
) -> None:
    token = live.token()
    data = bytearray(speech_files["wav"].read_bytes())
    data[-1] ^= 1  # one sample's low bit: bytes no other test sends
    sha = hashlib.sha256(data).hexdigest()
    headers = {"Authorization": f"Bearer {token}"}
    sids = [httpx.post(f"{live.http}/v1/sessions", headers=headers, json={}).json()["id"] for _ in range(2)]
    for sid in sids:  # the same recording sent to two sessions (review mode: stored, no turn)
        r = httpx.post(
            f"{live.http}/v1/sessions/{sid}/audio?review=true", headers=headers,
            files={"file": ("a.wav", bytes(data), "audio/wav")}, timeout=60,
        )  # fmt: skip
        assert r.status_code == 200 and r.json()["attachment_id"], r.text
    path = live.app.state.blobs.path(sha)  # type: ignore[attr-defined]
    assert path.read_bytes() == data
    assert httpx.delete(f"{live.http}/v1/sessions/{sids[0]}", headers=headers).status_code == 204
    assert path.read_bytes() == data and stored(live, sids[1])[1]  # the other session still has it
    assert httpx.delete(f"{live.http}/v1/sessions/{sids[1]}", headers=headers).status_code == 204
    assert not path.exists()


# ----------------------------------------------------------------------------- bad input


def test_bad_websocket_audio_gets_typed_errors_and_stores_nothing(live: LiveServer, pcm: bytes) -> None:
    bob_sid = run(_bob_session(live))
    blobs_before = blob_count(live)

    async def scenario() -> tuple[str, dict[str, str]]:
        codes: dict[str, str] = {}
        async with ws_client(live, live.token()) as c:
            sid = await c.new_session()

            async def answer(eid: str) -> str:
                return (await c.until(lambda e: e.get("event_id") == eid))["code"]

            async def start(**extra: object) -> None:
                eid = await c.send(type="audio.start", session_id=sid, **extra)
                assert (await c.until(lambda e: e.get("event_id") == eid))["type"] == "audio.started"

            codes["commit_without_start"] = await answer(await c.send(type="audio.commit", session_id=sid))
            codes["clear_without_start"] = await answer(await c.send(type="audio.clear", session_id=sid))
            await c.ws.send(b"\x00\x01")
            codes["binary_without_start"] = (await c.until_type("error"))["code"]
            codes["wrong_format"] = await answer(await c.send(type="audio.start", session_id=sid, format="opus"))
            codes["wrong_rate"] = await answer(await c.send(type="audio.start", session_id=sid, sample_rate=48000))
            codes["other_users_session"] = await answer(await c.send(type="audio.start", session_id=bob_sid))
            await start()
            codes["empty"] = await answer(await c.send(type="audio.commit", session_id=sid))
            await start()
            await c.ws.send(pcm[:FRAME + 1])
            codes["odd_length"] = await answer(await c.send(type="audio.commit", session_id=sid))
            await start()
            await c.ws.send(bytes(16_000 * 2))
            codes["silent"] = await answer(await c.send(type="audio.commit", session_id=sid))
            await start()
            await c.ws.send(pcm)
            eid = await c.send(type="audio.clear", session_id=sid)
            assert (await c.until(lambda e: e.get("event_id") == eid))["type"] == "audio.cleared"
            codes["commit_after_clear"] = await answer(await c.send(type="audio.commit", session_id=sid))
            await start()
            for _ in range(9):  # 9 s of audio: past the 8 s limit
                await c.ws.send(bytes(32_000))
            codes["too_long_while_streaming"] = (await c.until_type("error"))["code"]
            codes["too_long_commit"] = await answer(await c.send(type="audio.commit", session_id=sid))
            # The connection still works.
            await c.send(type="ping", event_id="alive")
            assert (await c.until(lambda e: e.get("event_id") == "alive"))["type"] == "pong"
        return sid, codes

    sid, codes = run(scenario())
    assert codes == {
        "commit_without_start": "audio_not_started",
        "clear_without_start": "audio_not_started",
        "binary_without_start": "binary_not_expected",
        "wrong_format": "audio_format_invalid",
        "wrong_rate": "audio_format_invalid",
        "other_users_session": "session_not_found",
        "empty": "audio_empty",
        "odd_length": "audio_format_invalid",
        "silent": "audio_silent",
        "commit_after_clear": "audio_empty",
        "too_long_while_streaming": "audio_too_long",
        "too_long_commit": "audio_too_long",
    }
    assert stored(live, sid) == ([], []) and blob_count(live) == blobs_before


async def _bob_session(live: LiveServer) -> str:
    async with ws_client(live, live.token("bob")) as bob:
        return await bob.new_session()


def test_bad_uploads_get_typed_http_errors_and_store_nothing(live: LiveServer, speech_files, tmp_path: Path) -> None:  # noqa: ANN001
    import subprocess

    token = live.token()
    auth = {"Authorization": f"Bearer {token}"}
    sid = httpx.post(f"{live.http}/v1/sessions", headers=auth, json={}).json()["id"]
    bob_sid = run(_bob_session(live))
    silent = tmp_path / "silent.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono",
                    "-t", "1", str(silent)], check=True, timeout=60)  # fmt: skip
    long = tmp_path / "long.ogg"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=440:r=16000",
                    "-t", "9", "-c:a", "libopus", str(long)], check=True, timeout=60)  # fmt: skip
    blobs_before = blob_count(live)
    good = speech_files["mp3"].read_bytes()

    def post(session: str, data: bytes, headers: dict | None = None) -> tuple[int, str]:
        r = httpx.post(f"{live.http}/v1/sessions/{session}/audio", headers=auth if headers is None else headers,
                       files={"file": ("f", data, "application/octet-stream")}, timeout=60)  # fmt: skip
        return r.status_code, (r.json().get("detail") or {}).get("code", "")

    assert post(sid, b"definitely not audio" * 100) == (415, "audio_undecodable")
    assert post(sid, b"") == (422, "audio_empty")
    assert post(sid, silent.read_bytes()) == (422, "audio_silent")
    assert post(sid, long.read_bytes()) == (422, "audio_too_long")
    assert post(sid, b"\x00" * 2_000_001) == (413, "audio_too_large")
    assert post(bob_sid, good) == (404, "session_not_found")
    assert post("no-such-session", good) == (404, "session_not_found")
    assert post(sid, good, headers={})[0] == 401
    assert stored(live, sid) == ([], []) and blob_count(live) == blobs_before


# ----------------------------------------------------------------------------- settings


def test_discard_retention_keeps_no_audio_and_a_missing_model_is_unavailable(
    tmp_path: Path, tiny_chat_model: Path, tiny_whisper: Path, speech_files, pcm: bytes  # noqa: ANN001
) -> None:
    srv = start_server(speech_settings(tmp_path / "discard", tiny_chat_model, tiny_whisper, audio_retention="discard"))
    try:
        token = srv.token()
        sid = httpx.post(f"{srv.http}/v1/sessions", headers={"Authorization": f"Bearer {token}"}, json={}).json()["id"]
        r = httpx.post(
            f"{srv.http}/v1/sessions/{sid}/audio", headers={"Authorization": f"Bearer {token}"},
            files={"file": ("a.webm", speech_files["webm"].read_bytes(), "audio/webm")}, timeout=60,
        )  # fmt: skip
        assert r.status_code == 200 and r.json()["turn_id"] and "attachment_id" not in r.json()

        async def over_ws() -> dict:
            async with ws_client(srv, token) as c:
                eid = await stream(c, sid, pcm)
                return await c.until(lambda e: e.get("event_id") == eid)

        final = run(over_ws())
        assert final["type"] == "transcript.final" and "attachment_id" not in final and final["turn_id"]
        msgs, atts = stored(srv, sid)
        assert [m["input"] for m in msgs if m["role"] == "user"] == ["speech", "speech"] and atts == []
        assert blob_count(srv) == 0
    finally:
        srv.stop()

    broken = start_server(speech_settings(tmp_path / "broken", tiny_chat_model, tmp_path / "missing.pt"))
    try:
        health = httpx.get(f"{broken.http}/healthz").json()
        assert health["skills"]["speech"]["state"] == "unavailable"
        assert "ASSISTANT_SPEECH_MODEL" in health["skills"]["speech"]["detail"]

        async def commit() -> dict:
            async with ws_client(broken, broken.token()) as c:
                sid = await c.new_session()
                eid = await stream(c, sid, pcm)
                return await c.until(lambda e: e.get("event_id") == eid)

        err = run(commit())
        assert err["type"] == "error" and err["code"] == "skill_unavailable"
        assert blob_count(broken) == 0
    finally:
        broken.stop()


def test_speech_is_documented_and_reported(live: LiveServer) -> None:
    doc = httpx.get(f"{live.http}/asyncapi.json").json()
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert {"audio.start", "audio.commit", "audio.clear", "audio.frame", "transcript.final", "transcript.partial"} <= names
    assert "/v1/sessions/{session_id}/audio" in httpx.get(f"{live.http}/openapi.json").json()["paths"]
    health = httpx.get(f"{live.http}/healthz").json()
    assert health["status"] == "ok" and health["skills"]["speech"]["state"] == "ready"
