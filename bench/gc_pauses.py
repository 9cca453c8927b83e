"""The web process's full garbage collections while bursts of chat turns come and go.

``--idle`` connections stay open the whole run. Each burst opens ``--sessions`` new connections,
sends one turn on each, and closes them when the replies are done. Each burst reports its turns'
time to first token p95, plus the server's full collections (generation 2) that fell inside it and
how long each stopped the process. The server runs under a probe that times every collection
itself (``gc.callbacks``). So the same command measures any commit, including one from before the
server reported collections in /metrics. ``--mode flood`` serves model-free replies; ``--mode
ours`` serves a tiny random-weight chat model in a process of its own. On the CPU, that model's
prefill dominates the time to first token.

    .venv/bin/python bench/gc_pauses.py --idle 300 --bursts 40 [--mode flood|ours] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROBE = "BENCH_GC_PROBE"  # set for the server process: where the probe writes what it timed


def probe_and_serve() -> None:
    """The server process: time each full collection (wall clock, ms, freed objects), rewrite the
    file every 0.2 s, and serve as ``bench.serve`` does."""
    path = Path(os.environ[PROBE])
    seen: list[tuple[float, float, int]] = []
    began = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        elif info["generation"] == 2:
            seen.append((time.time(), (time.perf_counter() - began[0]) * 1e3, info["collected"]))

    def write() -> None:
        while True:
            time.sleep(0.2)
            path.write_text(json.dumps({"full": seen[:], "frozen": gc.get_freeze_count()}))

    gc.callbacks.append(callback)
    threading.Thread(target=write, daemon=True).start()
    from bench.serve import main as serve

    serve()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["flood", "ours"], default="flood")
    ap.add_argument("--idle", type=int, default=300, help="connections held open the whole run")
    ap.add_argument("--bursts", type=int, default=40)
    ap.add_argument("--sessions", type=int, default=64, help="turns (new connections) per burst")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from bench import load
    from bench.report import emit, stamp
    from bench.run import ServerProcess, free_port
    from bench.serve import raise_fd_limit

    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="gc-pauses-"))
    if args.mode == "flood":
        serve_args = ["--mode", "flood", "--flood-words", "64"]
    else:
        from tests.tiny_models import build_tiny_chat_model

        model = build_tiny_chat_model(workdir / "chat", layers=2, hidden=32, weight_std=0.35)
        serve_args = ["--mode", "ours", "--chat-model", str(model), "--device", "cpu", "--worker", "process",
                      "--max-new-tokens", "32"]  # fmt: skip
    os.environ[PROBE] = str(workdir / "gc.json")
    srv = ServerProcess("gc", serve_args, workdir, free_port(), module="bench.gc_pauses")
    windows: list[tuple[float, float, float]] = []  # (start, end, TTFT p95 ms) per burst

    async def drive() -> None:
        idle = await load.idle_sessions(srv.ws, srv.token, args.idle)
        try:
            for _ in range(args.bursts):
                start = time.time()
                burst = await load.chat_load(srv.ws, srv.token, args.sessions)
                windows.append((start, time.time(), burst["ttft_ms"]["p95"]))
        finally:
            await load.close_all(idle)

    try:
        t0 = time.time()
        asyncio.run(drive())
        time.sleep(0.5)  # the probe's next write
        probed = json.loads((workdir / "gc.json").read_text())
    finally:
        srv.stop()
    full = [c for c in probed["full"] if c[0] >= t0]
    bursts = []
    for start, end, p95 in windows:
        inside = [round(ms, 1) for at, ms, _ in full if start <= at <= end]
        bursts.append({"ttft_p95_ms": p95, "full_gc_ms": inside})
    p95s = sorted(b["ttft_p95_ms"] for b in bursts)
    result = {
        **stamp(), "mode": args.mode, "idle": args.idle, "sessions": args.sessions, "cpus": os.cpu_count(),
        "frozen_objects": probed["frozen"],
        "bursts_ttft_p95_ms": {"median": p95s[len(p95s) // 2], "p90": p95s[int(0.9 * len(p95s))], "max": p95s[-1]},
        "full_gc": {"collections": len(full), "ms": [round(c[1], 1) for c in full], "freed": [c[2] for c in full],
                    "max_ms": round(max((c[1] for c in full), default=0.0), 1)},
        "bursts": bursts,
    }  # fmt: skip
    emit(result, args.out)


if __name__ == "__main__":
    if os.environ.get(PROBE):
        probe_and_serve()
    else:
        main()
