"""The FastAPI app factory: wiring, lifespan, and the small routes (health, metrics, docs, page)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from assistant import __version__
from assistant.asyncapi import build_asyncapi
from assistant.audio_routes import router as audio_router
from assistant.dialogue import DialogueManager
from assistant.loop_lag import watch_loop_lag
from assistant.metrics import Metrics
from assistant.profiles import resolve_models
from assistant.protocol import PROTOCOL_VERSION, SkillState
from assistant.rest import router as rest_router
from assistant.uploads import router as uploads_router
from assistant.settings import Settings
from assistant.speech_input import SpeechInput
from assistant.ws import websocket_endpoint
from skills.base import Skill
from skills.gc_pauses import PauseWatch, freeze_loaded, unfreeze
from skills.registry import build_skills
from state import db as state_db
from state.attachments import BlobStore, sweep_blobs
from state.checkpoints import WalCheckpointer
from state import store

log = logging.getLogger(__name__)


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """How uvicorn serves the app (the CLI, the benchmarks and the tests share these). Websocket
    frames go out uncompressed: they are small JSON events, and permessage-deflate kept a zlib
    context per connection (81 KiB per idle session against 35 without, over 1,000 sessions) and
    took about 5% of the web process's time per frame (``bench/README.md``)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "ws_max_size": max(4 * settings.max_frame_bytes, 1 << 20),
        "ws_per_message_deflate": False,
    }


def bootstrap_owner(app: FastAPI) -> str | None:
    """On a database with no user, create one and return a fresh token for the login URL."""
    with app.state.sessions.begin() as db:
        if store.count_users(db):
            return None
        user = store.get_or_create_user(db, name=app.state.settings.bootstrap_user)
        return store.create_token(db, user=user, label="bootstrap")


async def sweep_orphaned_blobs(app: FastAPI) -> None:
    """At start, beside serving: remove stored files no attachment refers to any more."""
    try:
        removed = await asyncio.to_thread(sweep_blobs, app.state.sessions, app.state.blobs)
    except Exception:  # noqa: BLE001 - a failed sweep leaves files, never loses any
        log.exception("could not sweep the blob folder")
        return
    if removed:
        log.info("removed %d stored files no attachment refers to", removed)


GC_PAUSE_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


async def freeze_when_loaded(loaders: list[asyncio.Task]) -> None:
    """Once every skill has loaded (or failed to), freeze what the process holds for good, so the
    garbage collector's full collections stop walking it (``skills/gc_pauses.py``)."""
    await asyncio.gather(*loaders, return_exceptions=True)
    log.info("froze %d long-lived objects out of the garbage collector's full collections", freeze_loaded())


def create_app(settings: Settings, *, skills: dict[str, Skill] | None = None) -> FastAPI:
    """Build the app. ``skills`` replaces the registry's skills (tests may pass their own)."""
    engine = state_db.make_engine(settings.database_url, background_checkpoints=True)
    db_file = state_db.sqlite_path(engine)
    checkpointer = WalCheckpointer(db_file) if db_file is not None else None
    metrics = Metrics()
    gc_watch = PauseWatch(GC_PAUSE_BOUNDS)  # every garbage collection's pause, in /metrics
    metrics.watch_gc_pauses(gc_watch)
    settings, model_plan = resolve_models(settings)
    skill_map = skills if skills is not None else build_skills(settings)
    first = getattr(skill_map.get("chat"), "chat_first", None)  # chat first on a shared GPU (skills/chat_first.py)
    if first is not None:
        metrics.watch_media_holds(first.held)
    prompt_tokens = getattr(skill_map.get("chat"), "prompt_tokens", None)
    if prompt_tokens is not None:
        metrics.watch_chat_prompt_tokens(prompt_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await asyncio.to_thread(state_db.upgrade, engine)
        if checkpointer is not None:
            checkpointer.start()
        interrupted = app.state.dialogue.recover()
        if interrupted:
            log.warning("marked %d turns interrupted by the last shutdown", interrupted)
        token = bootstrap_owner(app)
        if token:
            url = f"http://{settings.host}:{settings.port}/#token={token}"
            print(f"\n  First start: created user {settings.bootstrap_user!r}. Open {url}\n", flush=True)
        loaders = [asyncio.create_task(s.start()) for s in skill_map.values()]
        sweep = asyncio.create_task(sweep_orphaned_blobs(app))
        lag_probe = asyncio.create_task(watch_loop_lag(metrics.loop_lag))
        gc_watch.start()
        freezer = asyncio.create_task(freeze_when_loaded(loaders))
        try:
            yield
        finally:
            freezer.cancel()
            gc_watch.stop()
            lag_probe.cancel()
            sweep.cancel()
            await app.state.dialogue.shutdown()
            for t in loaders:
                t.cancel()
            await asyncio.gather(*loaders, return_exceptions=True)
            await asyncio.gather(*(s.stop() for s in skill_map.values()), return_exceptions=True)
            engine.dispose()
            if checkpointer is not None:
                await asyncio.to_thread(checkpointer.stop)
            unfreeze()

    app = FastAPI(title="Assistant", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.checkpointer = checkpointer
    app.state.sessions = state_db.make_session_factory(engine)
    app.state.metrics = metrics
    app.state.blobs = BlobStore(settings.data_dir / "blobs")
    app.state.skills = skill_map
    app.state.dialogue = DialogueManager(
        settings=settings, sessions=app.state.sessions, skills=skill_map, metrics=metrics, blobs=app.state.blobs
    )

    def skill_states() -> list[SkillState]:
        out = []
        for name, skill in skill_map.items():
            st = skill.status()
            metrics.skill_ready.labels(name).set(1 if st.state == "ready" else 0)
            out.append(SkillState(name=name, ready=st.state == "ready", state=st.state, detail=st.detail))
        return out

    app.state.skill_states = skill_states
    app.state.model_plan = model_plan
    app.state.speech = SpeechInput(app.state)
    app.include_router(rest_router)
    app.include_router(uploads_router)
    app.include_router(audio_router)
    app.add_api_websocket_route("/v1/ws", websocket_endpoint)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> JSONResponse:
        states = skill_states()
        ok = all(s.state in ("ready", "disabled") for s in states)
        body = {
            "status": "ok" if ok else "degraded",
            "version": __version__,
            "protocol_version": PROTOCOL_VERSION,
            "model_profile": model_plan.effective,
            "models": {k: {"source": m.source, "model": m.model, "note": m.note} for k, m in model_plan.skills.items()},
            "skills": {s.name: s.model_dump(exclude={"name"}) for s in states},
        }
        for name, skill in skill_map.items():  # which engine serves each loaded model skill
            engine = skill.status().extra.get("engine")
            if engine:
                body["skills"][name]["engine"] = engine
        return JSONResponse(body)

    @app.get("/metrics", tags=["ops"])
    def prometheus_metrics() -> Response:
        skill_states()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/asyncapi.json", tags=["docs"])
    def asyncapi(request: Request) -> JSONResponse:
        return JSONResponse(build_asyncapi(request.url.netloc))

    if settings.web_dir.is_dir():
        app.mount("/web", StaticFiles(directory=settings.web_dir), name="web")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(settings.web_dir / "index.html")

    return app
