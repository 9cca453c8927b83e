"""Turn admission under a burst: 64 sessions on open connections send a turn at once, N times.

The server runs the model-free flood skill (one word a reply), so what is measured is the web
process's own work per turn: store it, route it, stream the first frame, finish it. Prints the
client-side time to first token (p50/p95 per burst, and their medians) and the server process's CPU
time per turn over the bursts (read from the OS); with ``--py-spy`` (the ``py-spy`` tool installed)
it also samples the server, to show where that time goes (``spy.raw`` in the printed workdir).

    .venv/bin/python bench/admission.py --bursts 10 [--py-spy] [--history-chars 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from bench.report import emit, stamp  # noqa: E402
from bench.load import _session, timed_turn  # noqa: E402
from bench.run import ServerProcess  # noqa: E402

SESSIONS = 64


async def bursts(url: str, token: str, n: int, on_ready) -> list[tuple[float, float]]:  # noqa: ANN001
    conns = []
    for _ in range(SESSIONS):
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"})
        conns.append((ws, await _session(ws)))
    await asyncio.sleep(1.0)
    on_ready()

    out = []
    for _ in range(n):
        ttfts = sorted(await asyncio.gather(*(timed_turn(ws, sid, "hi") for ws, sid in conns)))
        out.append((ttfts[len(ttfts) // 2] * 1e3, ttfts[int(len(ttfts) * 0.95)] * 1e3))
        await asyncio.sleep(0.3)
    for ws, _ in conns:
        await ws.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bursts", type=int, default=10)
    ap.add_argument("--history-chars", type=int, help="the history a turn reads (small: every session reads older turns)")
    ap.add_argument("--port", type=int, default=8934)
    ap.add_argument("--py-spy", action="store_true", help="sample the server with py-spy: CPU ms per turn")
    ap.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="admission-"))
    window = [] if args.history_chars is None else ["--history-chars", str(args.history_chars)]
    server = ServerProcess("flood", ["--mode", "flood", "--flood-words", "1", "--device", "cpu", *window], workdir, args.port)
    spy, cpu = None, {}
    try:

        def start_spy() -> None:
            nonlocal spy
            cpu["start"] = server.cpu_s()
            if args.py_spy:
                spy = server.sample(workdir / "spy.raw")

        runs = asyncio.run(bursts(server.ws, server.token, args.bursts, start_spy))
        cpu["end"] = server.cpu_s()
    finally:
        server.end_sample(spy)
        server.stop()
    result = {
        **stamp(),
        "cpus": psutil.cpu_count(),
        "sessions": SESSIONS,
        "history_chars": args.history_chars,
        "bursts_ttft_ms_p50_p95": [(round(a, 1), round(b, 1)) for a, b in runs],
        "median_ttft_ms": {"p50": round(statistics.median(r[0] for r in runs), 1), "p95": round(statistics.median(r[1] for r in runs), 1)},
    }
    result["server_cpu_ms_per_turn"] = round((cpu["end"] - cpu["start"]) * 1e3 / (SESSIONS * args.bursts), 2)
    raw = workdir / "spy.raw"
    if raw.exists():
        samples = sum(int(line.rsplit(" ", 1)[1]) for line in raw.read_text().splitlines() if line.strip())
        result["py_spy_ms_per_turn"] = round(samples / (SESSIONS * args.bursts), 2)
        result["py_spy_raw"] = str(raw)
    emit(result, args.out)


if __name__ == "__main__":
    main()
