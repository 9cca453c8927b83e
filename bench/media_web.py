"""The web process's own CPU time per speech utterance and per caption turn.

Under speech and vision load the chat turns' ``admit`` stage grows (the mixed phase on the GPU: 35 ->
55 ms), because the event loop that admits chat turns also serves the media clients. This measures
that share: a server with model-free chat (the flood skill) and tiny Whisper and BLIP models in
processes of their own, 8 clients of each kind at once (review-mode speech as in the mixed phase).
The server process's CPU time (read from the OS; its children's is not counted), less what it uses
idle over the same time, is the web side of each request: frames, storage, routing, the hand-over
to the model's process and the reply; its main thread's share is the event loop's. ``--py-spy``
adds a sampled profile (``spy.raw`` in the printed workdir).

    .venv/bin/python bench/media_web.py --requests 192 --kinds vision [--py-spy] [--out FILE]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.report import emit, stamp  # noqa: E402
from bench.load import _speech_client, _vision_client, until  # noqa: E402
from bench.run import ServerProcess, free_port, media_inputs  # noqa: E402

STREAMS = 8  # clients of each kind at once


async def drive(kind: str, srv: ServerProcess, n: int, pcm: bytes, image: bytes) -> tuple[int, list[float], float]:
    """Keep ``STREAMS`` clients of ``kind`` busy until ``n`` requests are done: (done, [server CPU s,
    event loop CPU s], wall s)."""
    stop, done = asyncio.Event(), []
    if kind == "speech":
        clients = [_speech_client(srv.ws, srv.token, pcm, stop, done) for _ in range(STREAMS)]
    else:
        clients = [_vision_client(srv.http, srv.ws, srv.token, image, stop, done) for _ in range(STREAMS)]
    tasks = [asyncio.create_task(c) for c in clients]
    await until(lambda: len(done) >= STREAMS, tasks, 0.01)  # each client's first request (connect, upload) is not counted
    start, cpu, t0 = len(done), cpu_s(srv), time.perf_counter()
    await until(lambda: len(done) - start >= n, tasks, 0.01)  # a client that fails ends the run with its error
    used, wall = [b - a for a, b in zip(cpu, cpu_s(srv))], time.perf_counter() - t0
    counted = len(done) - start
    stop.set()
    await asyncio.gather(*tasks)
    return counted, used, wall


def cpu_s(srv: ServerProcess) -> tuple[float, float]:
    """CPU seconds so far of the server process (its threads, not its children) and of its main
    thread alone, the event loop's."""
    main = next(t for t in psutil.Process(srv.pid).threads() if t.id == srv.pid)
    return srv.cpu_s(), main.user_time + main.system_time


def idle_rate(srv: ServerProcess, seconds: float = 10.0) -> list[float]:
    """``cpu_s``'s seconds per second with no client: the timers (uvicorn's tick, the loop-lag probe,
    the WAL checkpointer), to take out of each phase (a CPU speech request takes seconds)."""
    cpu = cpu_s(srv)
    time.sleep(seconds)
    return [(b - a) / seconds for a, b in zip(cpu, cpu_s(srv))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=96, help="counted requests of each kind")
    ap.add_argument("--kinds", nargs="+", default=["speech", "vision"], choices=["speech", "vision"])
    ap.add_argument("--py-spy", action="store_true", help="sample the server with py-spy")
    ap.add_argument("--native", action="store_true", help="py-spy: native frames too (pauses the server: CPU figures inflate)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from bench.speech_rtf import build_model as build_whisper
    from bench.vision_batching import build_model as build_blip

    workdir = Path(tempfile.mkdtemp(prefix="media-web-"))
    speech = build_whisper(workdir, "tiny")
    caption = build_blip(workdir / "caption", "tiny", "caption")
    pcm, image = media_inputs()
    args_ = ["--mode", "flood", "--flood-words", "1", "--device", "cpu", "--media-worker", "process",
             "--speech-model", str(speech), "--caption-model", str(caption)]  # fmt: skip
    srv = ServerProcess("media", args_, workdir, free_port())
    result: dict = {**stamp(),
                    "cpus": psutil.cpu_count(), "streams": STREAMS, "audio_s": len(pcm) / 32000}  # fmt: skip
    spy = None
    try:
        if args.py_spy:
            spy = srv.sample(workdir / "spy.raw", native=args.native)
        idle = idle_rate(srv)
        result["idle_cpu_share"] = {"server": round(idle[0], 5), "loop": round(idle[1], 5)}
        for kind in args.kinds:
            done, used, wall = asyncio.run(drive(kind, srv, args.requests, pcm, image))
            server, loop = ((u - i * wall) * 1e3 / done for u, i in zip(used, idle))
            result[kind] = {"requests": done, "wall_s": round(wall, 2), "server_cpu_ms_per_request": round(server, 2),
                            "loop_cpu_ms_per_request": round(loop, 2)}  # fmt: skip
            print(f"  {kind}: {done} requests in {wall:.1f} s; beyond idle, CPU per request: server {server:.2f} ms, "
                  f"its event loop {loop:.2f} ms", flush=True)
    finally:
        if spy is not None:
            srv.end_sample(spy)
            result["py_spy_raw"] = str(workdir / "spy.raw")
        srv.stop()
    emit(result, args.out)


if __name__ == "__main__":
    main()
