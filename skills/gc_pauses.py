"""Short pauses of Python's cyclic garbage collector in the server's long-running processes.

A full collection (generation 2) walks every container object the process holds, and nothing else
in the process runs meanwhile: not the web process's event loop, not the chat model's scheduler. A
process that has imported torch and transformers holds about 400,000 of them, so each full
collection stopped it for 100-370 ms on the 2-core CPU (``bench/README.md``, "Garbage collector
pauses"), at times the collector chose: in the middle of a burst of turns or of a model's decode.

Once a process has loaded what it keeps for its lifetime (libraries, models, tokenizers),
``freeze_loaded()`` collects once and moves every object that exists then into the collector's
permanent generation, which later collections skip; full collections then walk only what was made
since. Frozen objects are still freed when nothing refers to them. ``PauseWatch`` times every
collection, for the web process's /metrics.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def freeze_loaded() -> int:
    """Collect, then freeze every object that exists now; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Give frozen objects back to the collector (a server that stops inside a longer-lived process, as in tests)."""
    gc.unfreeze()


class PauseWatch:
    """Calls ``observe(generation, seconds)`` after each collection in this process while started."""

    def __init__(self, observe: Callable[[int, float], None]) -> None:
        self._observe = observe
        self._began = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self._observe(info["generation"], time.perf_counter() - self._began)

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
