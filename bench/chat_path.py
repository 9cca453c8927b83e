"""The web process's cost per chat output: from the model process's message to the text delta.

Drives the real pieces with no model: ``ChatProcessWorker._dispatch`` (what the reader thread
schedules on the event loop for each message from the model process) hands one new token (or
``--tokens-per-message``) per stream to each ``ChatRun``, which wakes, detokenizes with a 151,936-token byte-level BPE tokenizer
(Qwen2.5's vocabulary size) and yields its delta. Each step lets the loop run until every run has
taken its output, so every output is one wake-up and one delta, as when the engine's steps are
slower than the loop. Prints the event loop's CPU time per output (process time, medians of rounds).

    .venv/bin/python bench/chat_path.py --out bench/results/chat_path_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit, stamp

VOCAB = 151_936


async def one_round(worker, streams: int, steps: int, seed: int, per_message: int = 1) -> tuple[float, int]:  # noqa: ANN001
    from skills.chat import ChatRun

    worker._loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    runs = []
    for i in range(streams):
        run = ChatRun(worker, f"r{i}", [1, 2, 3])
        worker._handlers[run.request_id] = (run.on_output, [])
        runs.append(run)
    deltas = [0]

    async def consume(run) -> None:  # noqa: ANN001
        async for _ in run:
            deltas[0] += 1

    tasks = [asyncio.create_task(consume(r)) for r in runs]
    await asyncio.sleep(0)
    stats = {"steps": 0, "max_concurrent": streams, "kv_free": 1.0, "prompt_tokens": (0, 0), "active": []}
    started = time.process_time()
    for step in range(0, steps, per_message):
        done = step + per_message >= steps
        new = min(per_message, steps - step)
        items = [(r.request_id, [rng.randrange(3, VOCAB) for _ in range(new)], done, None, 0) for r in runs]
        worker._dispatch(("out", items, stats))
        for _ in range(4):  # every run takes its output before the next step
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return time.process_time() - started, deltas[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens-per-message", type=int, default=1,
                    help="new tokens per stream in each message (the pump's cadence over the step time: 10 ms / 2.1 ms ~ 5)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from skills.chat_process import ChatProcessWorker
    from skills.chat_worker import ChatWorkerOptions
    from tests.tiny_models import build_chat_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="chat-path-"))
    build_chat_tokenizer(folder, VOCAB)
    worker = ChatProcessWorker(ChatWorkerOptions(model=str(folder)))
    worker.tokenizer, worker.eos_token_ids = AutoTokenizer.from_pretrained(folder), [2]
    worker.is_running = lambda: True  # no model process: the loop's side alone
    per_output = []
    for i in range(args.rounds):
        cpu, deltas = asyncio.run(one_round(worker, args.streams, args.steps, i, args.tokens_per_message))
        per_output.append(cpu * 1e6 / (args.streams * args.steps))
    result = {
        **stamp(),
        "streams": args.streams, "steps": args.steps, "vocab": VOCAB, "tokens_per_message": args.tokens_per_message,
        "loop_cpu_us_per_output": [round(x, 1) for x in per_output],  # per token (one output per token when 1)
        "median_us_per_output": round(statistics.median(per_output), 1),
    }  # fmt: skip
    emit(result, args.out)


if __name__ == "__main__":
    main()
