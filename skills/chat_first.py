"""Chat first on a shared GPU: the speech and vision models hold back while chat prompts wait for prefill.

Each model runs in a process of its own, so each has its own CUDA context, and a GPU time-slices
contexts: while the speech or vision process has kernels queued, the chat model's prefill waits for
its slice. On the H200 mixed-load run (bench/README.md), 64 chat turns' time to first token rose from
119 to 166 ms p95 while 16 speech and 16 vision streams ran.

``ChatFirst`` is one integer in shared memory, made in the web process and handed to the model
processes when they are spawned. The chat model's slot scheduler sets it while prompts wait for
prefill (and a slot is free for them) and clears it when they are in. The static Whisper decoder and
the vision model's ``generate`` call ``hold()`` before each step: it returns at once when the flag
is clear; otherwise it waits for it to clear, at most ``max_hold_s``. A hold that reaches that bound
leaves media ``min_run_s`` without holds. So media pauses while a burst of chat turns is prefilled
(the flag may clear and rise again between the burst's prefill groups), and chat prompts that keep
waiting cannot starve it. Media work already queued on the GPU (one step) still runs.

Transformers' own continuous-batching engine has no hook for this: with it, the flag stays clear.
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

MAX_HOLD_S = 0.1  # longest a media step waits for chat prompts
MIN_RUN_S = 0.05  # after a hold that lasted MAX_HOLD_S, media runs this long without one
POLL_S = 0.0005


class ChatFirst:
    def __init__(self, *, max_hold_s: float = MAX_HOLD_S, min_run_s: float = MIN_RUN_S) -> None:
        self._flag = multiprocessing.get_context("spawn").RawValue("i", 0)
        self.max_hold_s, self.min_run_s = max_hold_s, min_run_s
        self._free_until = 0.0  # per process: each gets its own copy of this object
        self.holds = 0  # in this process: holds that waited, and for how long in all
        self.held_s = 0.0

    def set(self, waiting: bool) -> None:
        """The chat side: prompts are waiting for prefill (True) or none is (False)."""
        self._flag.value = int(waiting)

    @property
    def waiting(self) -> bool:
        return bool(self._flag.value)

    def hold(self) -> float:
        """The media side, before each step: wait while chat prompts wait (bounded, see the module
        docstring). Returns the seconds waited."""
        if not self._flag.value:
            return 0.0
        start = time.monotonic()
        if start < self._free_until:
            return 0.0
        deadline = start + self.max_hold_s
        now = start
        while self._flag.value and now < deadline:
            time.sleep(POLL_S)
            now = time.monotonic()
        if self._flag.value:  # held as long as a step may be: media's turn now, however long chat waits
            self._free_until = now + self.min_run_s
        self.holds += 1
        self.held_s += now - start
        return now - start

    def __getstate__(self) -> dict[str, Any]:  # pickled only as a spawned process's argument
        return {**self.__dict__, "_free_until": 0.0, "holds": 0, "held_s": 0.0}
