"""Shared fixtures: a tiny chat model on disk and a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from websockets.asyncio.client import connect

from assistant.server import create_app, uvicorn_options
from assistant.settings import Settings
from state import db as state_db
from state import store
from tests.tiny_models import build_tiny_chat_model
from tests.speech_fixtures import speech_files, tiny_whisper  # noqa: F401 - shared speech fixtures


class WordsRun:
    """A model-free skill run that streams ``text`` a word at a time, ``pause`` seconds apart."""

    def __init__(self, text: str, pause: float = 0.01) -> None:
        from skills.base import SkillUsage

        self.text, self.pause, self.usage = text, pause, SkillUsage()

    def cancel(self) -> None:
        pass

    async def __aiter__(self):  # noqa: ANN204
        for word in self.text.split(" "):
            await asyncio.sleep(self.pause)
            yield word + " "


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(tmp: Path, model: Path, **overrides: object) -> Settings:
    base: dict[str, object] = dict(
        host="127.0.0.1",
        port=free_port(),
        database_url=f"sqlite:///{tmp / 'assistant.db'}",
        data_dir=tmp / "data",
        chat_model=str(model),
        chat_device="cpu",
        chat_max_new_tokens=24,
        chat_kv_blocks=64,
        chat_kv_page_size=32,
        chat_max_batch_tokens=512,
        chat_context_tokens=1024,
        delta_flush_interval=0.0,
        speech_model="",  # speech off unless a test passes a tiny Whisper checkpoint
        caption_model="",  # vision off unless a test passes tiny BLIP folders
        vqa_model="",
    )
    base.update(overrides)
    return Settings(**base)


def chat_manager(tmp: Path, skill: object):  # noqa: ANN201
    """A dialogue manager on a fresh SQLite file, ``skill`` as its chat skill, without a server:
    (engine, session factory, manager)."""
    from assistant.dialogue import DialogueManager
    from assistant.metrics import Metrics

    settings = make_settings(tmp, tmp, load_models=False)
    engine = state_db.make_engine(settings.database_url)
    state_db.upgrade(engine)
    sessions = state_db.make_session_factory(engine)
    return engine, sessions, DialogueManager(settings=settings, sessions=sessions, skills={"chat": skill}, metrics=Metrics())


@dataclass
class LiveServer:
    settings: Settings
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def http(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.settings.host}:{self.settings.port}/v1/ws"

    def token(self, user: str = "alice") -> str:
        with state_db.make_session_factory(self.app.state.engine).begin() as db:  # type: ignore[attr-defined]
            return store.create_token(db, user=store.get_or_create_user(db, name=user), label="test")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(settings: Settings, **kwargs: object) -> LiveServer:
    app = create_app(settings, **kwargs)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", **uvicorn_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    live = LiveServer(settings, app, server, thread)
    wait_ready(live)
    return live


def wait_ready(live: LiveServer, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{live.http}/healthz").json()
        if all(s["state"] != "loading" for s in health["skills"].values()) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[LiveServer]:
    live = start_server(make_settings(tmp_path_factory.mktemp("srv"), tiny_chat_model))
    yield live
    live.stop()


class Client:
    """A websocket client that keeps every event it received, for assertions."""

    def __init__(self, ws) -> None:  # noqa: ANN001
        self.ws = ws
        self.events: list[dict] = []
        self.hello: dict | None = None
        self._n = 0

    async def send(self, **event: object) -> str:
        self._n += 1
        event.setdefault("event_id", f"e{self._n}")
        await self.ws.send(json.dumps(event))
        return str(event["event_id"])

    async def recv(self, timeout: float = 30) -> dict:
        ev = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        self.events.append(ev)
        return ev

    async def until(self, pred, timeout: float = 30) -> dict:  # noqa: ANN001
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            ev = await self.recv(max(0.01, deadline - asyncio.get_running_loop().time()))
            if pred(ev):
                return ev

    async def until_type(self, kind: str, timeout: float = 30, **match: object) -> dict:
        return await self.until(lambda e: e["type"] == kind and all(e.get(k) == v for k, v in match.items()), timeout)

    async def new_session(self) -> str:
        eid = await self.send(type="session.create")
        ev = await self.until_type("session.created", event_id=eid)
        return ev["session_id"]

    async def turn(self, session_id: str, text: str, **extra: object) -> tuple[str, dict]:
        """Send a turn and wait for its response.done; returns (turn_id, done)."""
        eid = await self.send(type="turn.create", session_id=session_id, text=text, **extra)
        created = await self.until(lambda e: e.get("event_id") == eid and e["type"] in ("turn.created", "error"))
        assert created["type"] == "turn.created", created
        done = await self.until_type("response.done", turn_id=created["turn_id"], timeout=60)
        return created["turn_id"], done


class _Connect:
    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def __aenter__(self) -> Client:
        self._cm = connect(self.url, additional_headers=self.headers, max_size=None)
        ws = await self._cm.__aenter__()
        client = Client(ws)
        client.hello = await client.recv()
        return client

    async def __aexit__(self, *exc: object) -> None:
        await self._cm.__aexit__(*exc)


def ws_client(live: LiveServer, token: str | None) -> _Connect:
    return _Connect(live.ws_url, token)
