"""Replies of different lengths through the slot engine, with and without moving requests down.

N requests start together with reply lengths spread evenly from ``--min-new`` to ``--max-new``
(the long ones in the high slots, the worst case), through ``ChatWorker`` (the server's code path),
once as the server runs it (a request left in a high slot moves down when the running ones fit a
narrower batch bucket) and once with the moves turned off. Reports wall time, tokens/s and the mean
rows per decode step, and the ratio, in one run.

    .venv/bin/python bench/staggered.py --device cpu --sessions 64 --out bench/results/staggered_cpu.json
    python3 bench/staggered.py --shape qwen2.5-0.5b --sessions 256 --max-new 512    # on a GPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit, stamp


def run(model_dir: Path, device: str, sessions: int, min_new: int, max_new: int, moves: bool) -> dict:
    from skills.chat_worker import ChatWorker, ChatWorkerOptions

    worker = ChatWorker(
        ChatWorkerOptions(model=str(model_dir), device=device, max_new_tokens=max_new, engine="slots", slots=sessions,
                          context_tokens=256)
    )  # fmt: skip
    worker.load()
    manager, engine = worker._manager, worker._manager.engine
    if not moves:
        manager._compact = lambda: None  # type: ignore[method-assign]
    engine.widths.clear()  # the load check's steps
    prompt = list(range(10, 42))
    lengths = [min_new + (max_new - min_new) * i // max(sessions - 1, 1) for i in range(sessions)]
    try:
        t0 = time.perf_counter()
        for i, n in enumerate(lengths):
            manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=n, streaming=False)
        done, tokens = set(), 0
        while len(done) < sessions:
            out = manager.get_result(timeout=1.0)
            if out is not None and out.is_finished():
                done.add(out.request_id)
                tokens += len(out.generated_tokens)
        wall = time.perf_counter() - t0
    finally:
        worker.close()
    rows = list(engine.widths)
    return {
        "moves": moves,
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "decode_steps": len(rows),
        "mean_rows_per_step": round(sum(rows) / max(len(rows), 1), 1),
        "requests_moved": engine.moves,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--min-new", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from bench.chat_model import build_chat_model

    model = build_chat_model(Path(tempfile.mkdtemp()) / "chat-model", args.shape)
    runs = [run(model, args.device, args.sessions, args.min_new, args.max_new, moves) for moves in (True, False, True, False)]
    best = {m: min((r for r in runs if r["moves"] == m), key=lambda r: r["wall_s"]) for m in (True, False)}
    result = {
        **stamp(),
        "shape": args.shape,
        "device": args.device,
        "sessions": args.sessions,
        "reply_tokens": [args.min_new, args.max_new],
        "runs": runs,
        "speedup_with_moves": round(best[False]["wall_s"] / best[True]["wall_s"], 2),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
