"""Chat first on a shared GPU: the speech and vision models hold back while chat prompts are due.

Each model runs in a process of its own, so each has its own CUDA context, and a GPU time-slices
contexts: while the speech or vision process has kernels queued, the chat model's prefill waits for
its slice. On the H200 mixed-load run (bench/README.md), 64 chat turns' time to first token rose from
119 to 166 ms p95 while 16 speech and 16 vision streams ran.

``ChatFirst`` is one integer and one deadline in shared memory, made in the web process and handed to
the model processes when they are spawned. The chat model's slot scheduler sets the integer while
prompts wait for prefill (and a slot is free for them) and clears it when they are in. Before that,
the web process sets the deadline (``expect``) when it routes chat turns, renews it as it starts
each, and clears it once the last has been handed over (``ChatSkill``): the prompts of a burst are
on their way, and the GPU should be free of media work when the first arrives (admitting and
starting a 64-turn burst took 35-55 ms on the H200 mixed run). A lone turn clears it a millisecond
or two after routing it. The static Whisper decoder and the vision model's ``generate`` call
``hold()`` before each step: it returns at once when neither is up; otherwise it waits for both to
clear, at most ``max_hold_s``. A hold that reaches that bound leaves media ``min_run_s`` without
holds. So media pauses while a burst of chat turns is admitted and prefilled (the flag may clear
and rise again between the burst's prefill groups), and chat prompts that keep waiting cannot
starve it. Media work already queued on the GPU (one step) still runs.

Transformers' own continuous-batching engine has no hook for this: with it, the flag stays clear.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

MAX_HOLD_S = 0.1  # longest a media step waits for chat prompts
MIN_RUN_S = 0.05  # after a hold that lasted MAX_HOLD_S, media runs this long without one
EXPECT_S = 0.05  # at most this long after routing or starting a chat turn, media waits for the rest to start
POLL_S = 0.0005


class ChatFirst:
    def __init__(self, *, max_hold_s: float = MAX_HOLD_S, min_run_s: float = MIN_RUN_S) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._flag = ctx.RawValue("i", 0)
        self._expected = ctx.RawValue("d", 0.0)  # time.monotonic() (one clock for every process) until which prompts are due
        # Every process's holds that waited, and the seconds they waited: the server's /metrics
        # (``assistant_media_chat_first_*``) and the mixed-load benchmark read them here.
        self._total = ctx.Array("d", 2)
        self.max_hold_s, self.min_run_s = max_hold_s, min_run_s
        self._free_until = 0.0  # per process: each gets its own copy of this object

    def set(self, waiting: bool) -> None:
        """The chat side: prompts are waiting for prefill (True) or none is (False)."""
        self._flag.value = int(waiting)

    def expect(self, within_s: float = EXPECT_S) -> None:
        """The web process: chat turns were routed, their prompts reach the scheduler soon."""
        self._expected.value = time.monotonic() + within_s

    def expected_done(self) -> None:
        """The web process: the expected prompts are all handed to the scheduler."""
        self._expected.value = 0.0

    @property
    def expecting(self) -> bool:
        return time.monotonic() < self._expected.value

    @property
    def waiting(self) -> bool:
        """Prompts wait for prefill (the scheduler's flag)."""
        return bool(self._flag.value)

    def pending(self, now: float | None = None) -> bool:
        """Prompts wait for prefill, or are expected."""
        return bool(self._flag.value) or (time.monotonic() if now is None else now) < self._expected.value

    def hold(self) -> float:
        """The media side, before each step: wait while chat prompts wait or are expected (bounded,
        see the module docstring). Returns the seconds waited."""
        start = time.monotonic()
        if not self.pending(start) or start < self._free_until:
            return 0.0
        deadline = start + self.max_hold_s
        now = start
        while self.pending(now) and now < deadline:
            time.sleep(POLL_S)
            now = time.monotonic()
        if self.pending(now):  # held as long as a step may be: media's turn now, however long chat waits
            self._free_until = now + self.min_run_s
        with self._total.get_lock():
            self._total[0] += 1
            self._total[1] += now - start
        return now - start

    def held(self) -> tuple[int, float]:
        """Holds that waited in every process (speech and vision), and the seconds they waited."""
        with self._total.get_lock():
            return int(self._total[0]), self._total[1]

    def __getstate__(self) -> dict[str, Any]:  # pickled only as a spawned process's argument
        return {**self.__dict__, "_free_until": 0.0}
