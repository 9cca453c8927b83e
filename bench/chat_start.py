"""What starting a chat turn costs the event loop: ``ChatSkill.run`` for a burst of turns.

The harness's ``start`` stage of time to first token (``assistant_ttft_stage_seconds``) is this call:
the chat template, tokenizing the prompt, and handing it to the model's process. It runs on the
event loop, so in a burst of 64 turns the last one waits for the 63 before it (the ``admit`` stage).
This loads the benchmark's chat model (``bench/chat_model.py``, tiny by default: the tokenizer is the
same for every shape) in a process of its own, as the server does on a GPU machine, and times
``--turns`` calls with the benchmark's 418-token prompt, ``--rounds`` times; each round's replies are
read to the end before the next. Then the same turns as a burst, all started at once as the
dialogue's tasks start them: the time until all are handed over, and the event loop thread's own CPU
time per turn. Prints and saves the medians.

    .venv/bin/python bench/chat_start.py --out bench/results/chat_start_cpu.json
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

from bench.report import emit, stamp  # noqa: E402
from bench.chat_model import build_chat_model  # noqa: E402
from bench.load import PROMPT  # noqa: E402
from skills.base import SkillRequest  # noqa: E402
from skills.chat import ChatSkill  # noqa: E402
from skills.chat_worker import ChatWorkerOptions  # noqa: E402


async def measure(model: Path, turns: int, rounds: int) -> dict[str, list[float]]:
    skill = ChatSkill(
        ChatWorkerOptions(model=str(model), device="cpu", max_new_tokens=4, context_tokens=1024),
        system_prompt="You are a helpful assistant.", context_tokens=1024, in_process=False,
    )  # fmt: skip
    await skill.start()
    out: dict[str, list[float]] = {"run_ms": [], "burst_ms": [], "burst_loop_cpu_ms_per_turn": []}

    async def drain(runs: list) -> None:  # noqa: ANN001
        for run in runs:
            async for _ in run:
                pass

    try:
        for r in range(rounds):
            times, runs = [], []
            for i in range(turns):
                start = time.perf_counter()
                runs.append(await skill.run(SkillRequest(session_id=f"s{i}", turn_id=f"t{r}-{i}", text=PROMPT)))
                times.append(time.perf_counter() - start)
            await drain(runs)
            out["run_ms"].append(statistics.median(times) * 1e3)
            # A burst: every turn started at once, as the dialogue's tasks do; the loop's own CPU.
            start, cpu = time.perf_counter(), time.thread_time()
            runs = await asyncio.gather(*(
                skill.run(SkillRequest(session_id=f"s{i}", turn_id=f"b{r}-{i}", text=PROMPT)) for i in range(turns)
            ))  # fmt: skip
            out["burst_ms"].append((time.perf_counter() - start) * 1e3)
            out["burst_loop_cpu_ms_per_turn"].append((time.thread_time() - cpu) * 1e3 / turns)
            await drain(runs)
    finally:
        await skill.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--turns", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model = build_chat_model(Path(tempfile.mkdtemp(prefix="chat-start-")) / "model", args.shape)
    measured = asyncio.run(measure(model, args.turns, args.rounds))
    result = {
        "benchmark": "chat_start",
        **stamp(),
        "turns": args.turns,
        "prompt_chars": len(PROMPT),
        "run_ms_median_per_round": [round(m, 3) for m in measured["run_ms"]],
        "run_ms_median": round(statistics.median(measured["run_ms"]), 3),
        "burst_ms_median": round(statistics.median(measured["burst_ms"]), 2),
        "burst_loop_cpu_ms_per_turn_median": round(statistics.median(measured["burst_loop_cpu_ms_per_turn"]), 3),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
