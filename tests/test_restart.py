"""The real ``assistant serve`` process: killed mid-stream and started again, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import Client, free_port
from websockets.asyncio.client import connect


def serve(tmp: Path, model: str, port: int, **env: str) -> subprocess.Popen:
    environ = {
        **os.environ,
        "ASSISTANT_PORT": str(port),
        "ASSISTANT_DATABASE_URL": f"sqlite:///{tmp / 'assistant.db'}",
        "ASSISTANT_CHAT_MODEL": model,
        "ASSISTANT_CHAT_DEVICE": "cpu",
        "ASSISTANT_CHAT_MAX_NEW_TOKENS": "3000",
        "ASSISTANT_CHAT_KV_BLOCKS": "128",
        "ASSISTANT_CHAT_KV_PAGE_SIZE": "32",
        "ASSISTANT_CHAT_MAX_BATCH_TOKENS": "512",
        "ASSISTANT_SPEECH_MODEL": "",  # speech off: never fetch Whisper weights in a test
        "ASSISTANT_CAPTION_MODEL": "",  # vision off: never try a model hub in a test
        "ASSISTANT_VQA_MODEL": "",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "assistant", "serve", "--log-level", "warning"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
            if all(s["state"] != "loading" for s in health["skills"].values()):
                return proc
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read())  # type: ignore[union-attr]
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def shut_down(proc: subprocess.Popen) -> None:
    """Ctrl-C, as an operator would; kill only if it does not exit."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def token_cli(tmp: Path) -> str:
    env = {**os.environ, "ASSISTANT_DATABASE_URL": f"sqlite:///{tmp / 'assistant.db'}"}
    out = subprocess.run(
        [sys.executable, "-m", "assistant", "token", "create", "--user", "dana"],
        env=env, capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


async def open_client(port: int, token: str) -> tuple[Client, object]:
    ws = await connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}", max_size=None)
    client = Client(ws)
    client.hello = await client.recv()
    return client, ws


def test_crash_mid_stream_then_restart_keeps_history_and_marks_the_turn_interrupted(
    tmp_path: Path, tiny_chat_model: Path
) -> None:
    port = free_port()
    proc = serve(tmp_path, str(tiny_chat_model), port)
    first_start_log = ""
    try:
        token = token_cli(tmp_path)

        async def before_crash() -> tuple[str, str, int]:
            c, ws = await open_client(port, token)
            sid = await c.new_session()
            # A first turn, stopped after a few tokens (replies run to 3000 tokens on this server).
            eid = await c.send(type="turn.create", session_id=sid, text="remember: the code word is tulip", skill="chat")
            first = (await c.until_type("turn.created", event_id=eid))["turn_id"]
            await c.until_type("response.delta", turn_id=first)
            await c.send(type="response.cancel", session_id=sid, turn_id=first)
            done = await c.until_type("response.done", turn_id=first)
            assert done["status"] == "cancelled" and done["text"]
            eid = await c.send(type="turn.create", session_id=sid, text="now talk for a long time")
            tid = (await c.until_type("turn.created", event_id=eid))["turn_id"]
            for _ in range(3):
                await c.until_type("response.delta", turn_id=tid)
            seen = max(e["seq"] for e in c.events if "seq" in e)
            os.kill(proc.pid, signal.SIGKILL)  # a crash, not a clean shutdown
            await ws.close()
            return sid, tid, seen

        sid, tid, seen = asyncio.run(before_crash())
        proc.wait(timeout=30)
        first_start_log = proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()

    assert "#token=" in first_start_log, "the first start prints a login URL for the bootstrap user"
    proc = serve(tmp_path, str(tiny_chat_model), port)
    try:
        h = {"Authorization": f"Bearer {token}"}
        sessions = httpx.get(f"http://127.0.0.1:{port}/v1/sessions", headers=h).json()["sessions"]
        assert [s["id"] for s in sessions] == [sid]
        msgs = httpx.get(f"http://127.0.0.1:{port}/v1/sessions/{sid}/messages", headers=h).json()["messages"]
        assert [m["text"] for m in msgs if m["role"] == "user"] == [
            "remember: the code word is tulip",
            "now talk for a long time",
        ]
        reply = msgs[-1]
        assert reply["turn_id"] == tid and reply["status"] == "interrupted"
        assert reply["text"], "text streamed before the crash is kept"

        async def after_restart() -> None:
            c, ws = await open_client(port, token)
            await c.send(type="session.resume", session_id=sid, last_seq=seen)
            await c.until_type("session.resumed")
            done = next(e for e in c.events if e["type"] == "response.done" and e["turn_id"] == tid)
            assert done["status"] == "interrupted"
            # The session goes on after the crash.
            eid = await c.send(type="turn.create", session_id=sid, text="what was the code word?")
            later = (await c.until_type("turn.created", event_id=eid))["turn_id"]
            assert (await c.until_type("response.delta", turn_id=later))["delta"]
            await c.send(type="response.cancel", session_id=sid, turn_id=later)
            assert (await c.until_type("response.done", turn_id=later))["status"] == "cancelled"
            await ws.close()

        asyncio.run(after_restart())
    finally:
        shut_down(proc)


def test_a_missing_model_leaves_the_server_up_and_says_which_setting_to_change(tmp_path: Path) -> None:
    port = free_port()
    proc = serve(tmp_path, str(tmp_path / "no-such-model"), port)
    try:
        health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
        chat = health["skills"]["chat"]
        assert health["status"] == "degraded" and chat["state"] == "unavailable"
        assert "ASSISTANT_CHAT_MODEL" in chat["detail"]
        token = token_cli(tmp_path)

        async def go() -> None:
            c, ws = await open_client(port, token)
            assert c.hello["skills"][0]["state"] == "unavailable"
            sid = await c.new_session()
            _, done = await c.turn(sid, "hello?")
            assert done["status"] == "failed" and done["error"]["code"] == "skill_unavailable"
            assert "ASSISTANT_CHAT_MODEL" in done["error"]["message"]
            await ws.close()

        asyncio.run(go())
    finally:
        shut_down(proc)
