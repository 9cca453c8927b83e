"""The chat model process's host work per decode step: the slot scheduler and the pump.

Runs the real ``SlotScheduler`` and the process transport's output pump (``skills.chat_process._pump``)
over an engine that computes nothing: a step's tokens are ready ``--gpu-ms`` after the device is
free of the step before (one at a time, in launch order), and reading them sleeps until then with
the GIL free, as a CUDA event wait does. The pump's
messages are pickled as the pipe would (and dropped). So what is measured is the Python both
threads spend per step for N running requests: on a GPU whose graph-replayed step takes a few
milliseconds, that work has to fit beside it. Prints the process's CPU time per decode step.

    .venv/bin/python bench/slot_host.py --out bench/results/slot_host_cpu.json
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit, stamp  # noqa: E402

from skills import chat_process  # noqa: E402
from skills.slot_engine import (  # noqa: E402
    BATCH_BUCKETS, MIN_CONTEXT_BUCKET, MIN_PROMPT_BUCKET, PREFILL_BATCH, bucket, doubling_buckets,
)
from skills.slot_scheduler import SlotScheduler  # noqa: E402


class _Step:
    def __init__(self, tokens: list[int], ready_at: float) -> None:
        self._tokens, self._ready_at = tokens, ready_at

    def tokens(self) -> list[int]:
        left = self._ready_at - time.perf_counter()
        if left > 0:
            time.sleep(left)  # the device's step; the GIL is free meanwhile
        return self._tokens


class IdleEngine:
    """The calls ``SlotScheduler`` makes of ``SlotEngine``, with no model behind them."""

    def __init__(self, slots: int, max_len: int, gpu_s: float) -> None:
        self.slots, self.max_len, self.gpu_s = slots, max_len, gpu_s
        self.batch_sizes = [b for b in BATCH_BUCKETS if b < slots] + [slots]
        self.contexts = doubling_buckets(MIN_CONTEXT_BUCKET, max_len)
        self.prompt_lengths = doubling_buckets(MIN_PROMPT_BUCKET, max_len)
        self.prefill_sizes = [p for p in PREFILL_BATCH if p <= slots]
        self.extend_sizes = self.prefill_sizes
        self.steps = 0
        self._free_at = 0.0  # the device runs one step at a time, in launch order

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> list[int]:
        return [7] * len(prompts)

    def extend(self, rows: list[int], prompts: list[list[int]], starts: list[int]) -> list[int]:
        return [7] * len(prompts)

    def launch(self, batch: int, context: int) -> _Step:
        assert batch == bucket(batch, self.batch_sizes) and context in self.contexts
        self.steps += 1
        self._free_at = max(time.perf_counter(), self._free_at) + self.gpu_s
        return _Step([11] * batch, self._free_at)

    def patch(self, rows: dict) -> None:
        pass

    def move(self, moves: dict, columns: int | None = None) -> None:
        pass

    def copy(self, sources: dict, columns: int) -> None:
        pass

    def reset(self) -> None:
        pass


class _Pipe:
    def __init__(self) -> None:
        self.messages = 0

    def send(self, msg: tuple) -> None:
        pickle.dumps(msg)
        self.messages += 1


class _Worker:
    """What the pump reads of ``ChatWorker``."""

    def __init__(self, manager: SlotScheduler) -> None:
        self._manager, self.steps, self.max_concurrent_requests = manager, 0, 0

    def kv_free_fraction(self) -> float:
        return self._manager.kv_free_fraction()

    def active_request_ids(self) -> set[str]:
        return self._manager.active_request_ids()

    def prompt_tokens(self) -> tuple[int, int]:
        return (0, 0)


def one_run(requests: int, new_tokens: int, gpu_s: float) -> dict:
    engine = IdleEngine(requests, 1024 + new_tokens, gpu_s)
    scheduler = SlotScheduler(engine, max_prefill_tokens=8192)
    scheduler.start()
    pipe, stop = _Pipe(), threading.Event()
    pump = threading.Thread(target=chat_process._pump, args=(_Worker(scheduler), pipe, threading.Lock(), stop, deque()))
    pump.start()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(requests):
        scheduler.add_request(list(range(100)), f"r{i}", new_tokens)
    while scheduler.active_request_ids():
        time.sleep(0.001)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop.set()
    pump.join()
    scheduler.stop()
    return {"steps": engine.steps, "messages": pipe.messages, "cpu_ms_per_step": round(cpu * 1e3 / engine.steps, 3),
            "wall_ms_per_step": round(wall * 1e3 / engine.steps, 3)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, nargs="*", default=[64, 256])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--gpu-ms", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result: dict = {**stamp(),
                    "gpu_ms": args.gpu_ms, "new_tokens": args.new_tokens, "runs": {}}  # fmt: skip
    for n in args.requests:
        runs = [one_run(n, args.new_tokens, args.gpu_ms / 1e3) for _ in range(args.rounds)]
        result["runs"][str(n)] = {"median_cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in runs), "rounds": runs}
    emit(result, args.out)


if __name__ == "__main__":
    main()
