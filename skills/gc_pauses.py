"""Short pauses of Python's cyclic garbage collector in the server's long-running processes.

A full collection (generation 2) walks every container object the process holds, and nothing else
in the process runs meanwhile: not the web process's event loop, not the chat model's scheduler. A
process that has imported torch and transformers holds about 400,000 of them, so each full
collection stopped it for 175-370 ms on the 2-core CPU (``bench/README.md``, "Garbage collector
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


def freeze_loaded() -> int:
    """Collect, then freeze every object that exists now; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Give frozen objects back to the collector (a server that stops inside a longer-lived process, as in tests)."""
    gc.unfreeze()


class PauseWatch:
    """Times each collection in this process while started: per generation, how many fell in each
    bucket (seconds, upper bounds) and their sum. The callback only adds numbers to lists: no lock
    and no new container, since it runs inside whatever allocation set off the collection (a
    metrics library's lock taken there could already be held by the same thread)."""

    GENERATIONS = 3

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [[0] * (len(bounds) + 1) for _ in range(self.GENERATIONS)]  # the last: above every bound
        self._sums = [0.0] * self.GENERATIONS
        self._began = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        seconds, generation = time.perf_counter() - self._began, info["generation"]
        bucket = 0
        while bucket < len(self.bounds) and seconds > self.bounds[bucket]:
            bucket += 1
        self._counts[generation][bucket] += 1
        self._sums[generation] += seconds

    def snapshot(self) -> list[tuple[list[int], float]]:
        """Per generation: cumulative counts at each bound and in all (the last), and the seconds summed."""
        out = []
        for counts, total in zip(self._counts, self._sums):
            cumulative, running = [], 0
            for n in counts:
                running += n
                cumulative.append(running)
            out.append((cumulative, total))
        return out

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
