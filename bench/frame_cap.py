"""Many streams at once: what capping the server's delta frames a second does to the event loop.

At 256 sessions on the H200 the web process was the limit (42% of event-loop probes more than 25 ms
late): 256 streams at one frame per 20 ms are 12,800 frames a second, more than its loop sends.
``ASSISTANT_DELTA_FRAMES_PER_S`` stretches every stream's frame interval so that all of them
together stay within the cap. This runs the model-free flood skill with a pause between words (a
model's time per output token) for ``--sessions`` streams, in a process of their own, and while
they stream sends ``--probes`` new turns one after another from this one, timing each to its first
frame. Per cap it reports the server's CPU seconds per second, the frames the streams got and
their gaps, the probes' time to first frame and the loop-lag probes from ``/metrics``.

    .venv/bin/python bench/frame_cap.py --sessions 256 --caps 0 4000 [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench import load  # noqa: E402
from bench.report import emit, stamp  # noqa: E402
from bench.run import ServerProcess, free_port  # noqa: E402


def streams(url: str, token: str, sessions: int, conn) -> None:  # noqa: ANN001
    """In a child process: ``sessions`` turns at once; sends back ``load.stream_stats``."""
    conn.send(asyncio.run(load.chat_load(url, token, sessions, text="go")))


async def probes(url: str, token: str, n: int) -> list[float]:
    """``n`` turns, one after another on one fresh session: ms from each turn's send to its first
    delta frame (then the turn is cancelled)."""
    out = []
    async with load.connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None) as ws:
        sid = await load._session(ws)
        for _ in range(n):
            sent = time.perf_counter()
            await ws.send(json.dumps({"type": "turn.create", "session_id": sid, "text": "probe"}))
            first, turn_id = None, None
            while True:
                raw = await ws.recv()
                if first is None and '"response.delta"' in raw[:64]:
                    first = time.perf_counter()
                    out.append((first - sent) * 1000)
                    await ws.send(json.dumps({"type": "response.cancel", "session_id": sid, "turn_id": turn_id}))
                    continue
                ev = json.loads(raw)
                if ev["type"] == "turn.created":
                    turn_id = ev["turn_id"]
                elif ev["type"] == "response.done":
                    break
                elif ev["type"] == "error":
                    raise RuntimeError(f"server error: {ev}")
            await asyncio.sleep(0.1)
    return out


def one(cap: float, args: argparse.Namespace, workdir: Path) -> dict:
    server = ServerProcess(
        f"cap{int(cap)}",
        ["--mode", "flood", "--device", "cpu", "--flood-words", str(args.words), "--flood-pace", str(args.pace),
         "--frames-per-s", str(cap)],
        workdir, free_port(),
    )  # fmt: skip
    try:
        ctx = multiprocessing.get_context("spawn")
        pipes, children = [], []
        for i in range(args.clients):  # the streams' clients, spread over processes to keep up
            ours, theirs = ctx.Pipe()
            share = args.sessions // args.clients + (i < args.sessions % args.clients)
            children.append(ctx.Process(target=streams, args=(server.ws, server.token, share, theirs)))
            pipes.append(ours)
        cpu0, t0 = server.cpu_s(), time.perf_counter()
        for child in children:
            child.start()
        time.sleep(args.settle)  # the streams are connected and running
        before = load.server_metrics(server.http)
        probe_ms = asyncio.run(probes(server.ws, server.token, args.probes))
        after = load.server_metrics(server.http)
        stats = [ours.recv() for ours in pipes]
        cpu, wall = server.cpu_s() - cpu0, time.perf_counter() - t0
        for child in children:
            child.join(30)
    finally:
        server.stop()
    tokens = sum(st["completion_tokens"] for st in stats)
    frames = sum(st["frames"] for st in stats)
    return {
        "cap_frames_per_s": cap,
        "server_cpu_s_per_s": round(cpu / wall, 3),
        "server_cpu_ms_per_1000_words": round(cpu * 1e6 / tokens, 1),
        "frames_per_1000_words": round(frames * 1000 / tokens, 1),
        "probe_ttft_ms": load.summary(probe_ms),
        "streams": {
            "completed": sum(st["completed"] for st in stats),
            "frames_per_s": round(sum(st["frames_per_s"] for st in stats), 1),
            "frame_gap_ms_p50_p95_per_client": [(st["frame_gap_ms"]["p50"], st["frame_gap_ms"]["p95"]) for st in stats],
            "wall_s": max(st["wall_s"] for st in stats),
        },
        **load.between(before, after),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--words", type=int, default=600, help="words per streamed reply")
    ap.add_argument("--pace", type=float, default=0.008, help="seconds between words (H200 TPOT at 256: 7.65 ms)")
    ap.add_argument("--probes", type=int, default=16)
    ap.add_argument("--clients", type=int, default=2, help="processes the streams' clients run in")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds from the streams' start to the first probe")
    ap.add_argument("--caps", type=float, nargs="+", default=[0, 4000])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="frame-cap-"))
    result = {
        **stamp(),
        "cpus": psutil.cpu_count(),
        "sessions": args.sessions,
        "pace_s": args.pace,
        "runs": [],
    }
    for cap in args.caps:
        run = one(cap, args, workdir)
        result["runs"].append(run)
        print(f"  cap {cap:g}: server CPU {run['server_cpu_s_per_s']} s/s, probe TTFT p50/p95 "
              f"{run['probe_ttft_ms']['p50']}/{run['probe_ttft_ms']['p95']} ms, "
              f"CPU per 1000 words {run['server_cpu_ms_per_1000_words']} ms, streams {run['streams']}, "
              f"loop lag {run['loop_lag']}", flush=True)  # fmt: skip
    emit(result, args.out)


if __name__ == "__main__":
    main()
