"""Deleting a long conversation: how long the event loop stops.

A session of ``--messages`` messages (300 characters each) and ``--events`` logged events is stored
in a real SQLite file, then deleted through ``DialogueManager.delete_session`` while a ticker task
records the gaps between its turns on the event loop (every other session's frames wait that long).
Reports the longest gap, the time until the delete returned, and until the rows were gone.

    .venv/bin/python bench/delete_session.py --out bench/results/delete_session_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit, stamp  # noqa: E402

from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.metrics import Metrics  # noqa: E402
from assistant.settings import Settings  # noqa: E402
from state import store  # noqa: E402
from state.checkpoints import WalCheckpointer  # noqa: E402
from state.db import make_engine, make_session_factory, sqlite_path, upgrade  # noqa: E402
from state.models import Event, Message, new_id  # noqa: E402


def fill(factory, user_id: str, messages: int, events: int) -> str:  # noqa: ANN001
    with factory.begin() as db:
        sid = store.create_session(db, user_id=user_id).id
        db.execute(Message.__table__.insert(), [
            {"id": new_id(), "session_id": sid, "turn_id": f"{sid}-{i // 2}", "position": i, "role": ("user", "assistant")[i % 2],
             "text": "x" * 300, "status": "completed", "attachment_ids": []} for i in range(messages)
        ])  # fmt: skip
        db.execute(Event.__table__.insert(), [
            {"session_id": sid, "seq": i + 1, "type": "response.delta", "payload": json.dumps({"delta": "y" * 60})}
            for i in range(events)
        ])  # fmt: skip
    return sid


async def delete(dm: DialogueManager, user_id: str, sid: str) -> dict:
    gaps: list[float] = []
    stop = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    gaps.clear()
    t0 = time.perf_counter()
    assert await dm.delete_session(user_id=user_id, session_id=sid)
    returned = time.perf_counter() - t0
    while getattr(dm, "_purges", None):
        await asyncio.sleep(0.001)
    gone = time.perf_counter() - t0
    stop = True
    await tick
    return {"longest_loop_gap_ms": round(max(gaps) * 1e3, 1), "delete_returned_ms": round(returned * 1e3, 1),
            "rows_gone_ms": round(gone * 1e3, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--events", type=int, default=80000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="delete-session-"))
    settings = Settings(database_url=f"sqlite:///{tmp / 'a.db'}", data_dir=tmp / "data")
    engine = make_engine(settings.database_url, background_checkpoints=True)
    upgrade(engine)
    checkpointer = WalCheckpointer(sqlite_path(engine))  # as the server runs it
    checkpointer.start()
    factory = make_session_factory(engine)
    dm = DialogueManager(settings=settings, sessions=factory, skills={}, metrics=Metrics())
    with factory.begin() as db:
        user = store.get_or_create_user(db, name="bench").id
    runs = []
    for _ in range(args.runs):
        sid = fill(factory, user, args.messages, args.events)
        runs.append(asyncio.run(delete(dm, user, sid)))
        print(runs[-1], flush=True)
    checkpointer.stop()
    result = {
        **stamp(),
        "messages": args.messages,
        "events": args.events,
        "runs": runs,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
