"""WAL checkpoints on a thread of their own, off the event loop.

SQLite in WAL mode appends each commit to the ``-wal`` file; by default the commit that takes the
file past 1,000 pages also copies them back into the database and syncs it (a checkpoint). In the
server that commit runs on the event loop, so every few seconds of streaming one frame's commit
paid for a copy and an fsync while every session waited. The server's connections turn automatic
checkpoints off (``state.db.make_engine(..., background_checkpoints=True)``) and this thread runs a
passive checkpoint every ``interval_s`` instead: it never blocks writers or readers, and Python's
``sqlite3`` releases the GIL while SQLite works. On ``stop()`` a final checkpoint truncates the WAL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class WalCheckpointer:
    def __init__(self, path: Path, *, interval_s: float = 0.5) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self.checkpoints = 0  # passive checkpoints run (observability)
        self.last: tuple[int, int, int] | None = None  # SQLite's (busy, WAL frames, frames checkpointed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then checkpoint everything and truncate the WAL (other connections may
        still be open: then what can be copied is, and the rest waits for the next start)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._checkpoint("TRUNCATE")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._checkpoint("PASSIVE")

    def _checkpoint(self, mode: str) -> None:
        try:
            with sqlite3.connect(self.path, timeout=30) as conn:
                self.last = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            self.checkpoints += 1
        except sqlite3.Error:  # a busy or missing database: the next tick tries again
            log.exception("WAL checkpoint (%s) of %s failed", mode, self.path)
