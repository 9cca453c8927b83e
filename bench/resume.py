"""How long opening a long conversation holds the event loop: ``session.resume`` from seq 0.

A client that opens an old conversation (another device, a cleared cache) resumes from seq 0 and
is sent the session's whole event log, read and queued while the event loop waits. This builds a
session of ``--turns`` turns of ``--words`` streamed words (one frame a word, as a busy reply
coalesces them) through the real dialogue manager and SQLite file, then times ``resume`` from 0.
Prints the milliseconds of each of ``--repeats`` resumes (Python's garbage collector, which runs
when it will, shows as the odd slow one).

    .venv/bin/python bench/resume.py --out bench/results/resume_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant import protocol as p  # noqa: E402
from assistant.dialogue import DialogueManager  # noqa: E402
from assistant.metrics import Metrics  # noqa: E402
from assistant.settings import Settings  # noqa: E402
from bench.report import emit, stamp  # noqa: E402
from bench.baseline import FloodSkill  # noqa: E402
from state import store  # noqa: E402
from state.db import make_engine, make_session_factory, upgrade  # noqa: E402


class Counter:
    """A subscriber that only counts what it is given."""

    def __init__(self) -> None:
        self.frames = 0

    def deliver(self, frame: str) -> None:
        self.frames += 1

    def replay(self, frames: list[str]) -> None:
        self.frames += len(frames)


async def run(turns: int, words: int, repeats: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="resume-"))
    settings = Settings(database_url=f"sqlite:///{tmp / 'a.db'}", data_dir=tmp / "data", delta_flush_interval=0.0)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as db:
        user = store.get_or_create_user(db, name="reader").id
    dm = DialogueManager(settings=settings, sessions=sessions, skills={"chat": FloodSkill(words)}, metrics=Metrics())
    sid = dm.create_session(user_id=user, title=None, sub=None, event_id=None)
    for i in range(turns):
        dm.create_turn(user_id=user, event=p.TurnCreate(session_id=sid, text=f"turn {i}"), sub=None)
        while dm._runners:  # the turn streams and ends
            await asyncio.sleep(0.001)
    times, frames = [], 0
    for _ in range(repeats):
        sub = Counter()
        started = time.perf_counter()
        dm.resume(user_id=user, session_id=sid, last_seq=0, sub=sub, event_id=None)
        times.append(round((time.perf_counter() - started) * 1e3, 2))
        dm.detach(sub)
        frames = sub.frames
    return {"turns": turns, "frames": frames, "resume_ms": times, "median_ms": statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {**stamp(),
              **asyncio.run(run(args.turns, args.words, args.repeats))}  # fmt: skip
    emit(result, args.out)


if __name__ == "__main__":
    main()
