"""A turn's cost as one session grows long: the history a turn reads, with and without a window.

One client grows one session turn by turn (a 40-word message, a 300-word model-free reply: the flood
skill) and, each time it reaches a checkpoint, sends ``--probes`` more turns one at a time. Per
checkpoint it reports the client's time to first token (median, p90) and the server process's CPU
per turn (from the OS, over the probes). Servers run one after another: ``window`` (the default,
``ASSISTANT_HISTORY_CHARS`` from the prompt budget: the newest 16 KiB here) and ``whole`` (0: every
turn reads the whole history, as before ``state/context.py``). The flood skill ignores the history,
so this is the web process's own work per turn: a chat model would then template what it was given.

With ``--images same`` every turn names the same uploaded image, with ``--images new`` a new one
(a camera that asks about each frame); the turns still go to the flood skill (``skill: chat``), so
what grows is the reading of the images' history: their numbers, the one in focus, the last question.

    .venv/bin/python bench/long_session.py --checkpoints 20 1000 2000 --out bench/results/long_session_cpu.json
    .venv/bin/python bench/long_session.py --images same --configs window --checkpoints 20 1000 4000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from bench.report import emit, stamp  # noqa: E402
from bench.load import _session, timed_turn  # noqa: E402
from bench.run import ServerProcess  # noqa: E402

MESSAGE = " ".join(f"word{i}" for i in range(40))
CONFIGS = {"window": [], "whole": ["--history-chars", "0"]}


async def grow(server: ServerProcess, checkpoints: list[int], probes: int, images: str = "none") -> list[dict]:
    out = []
    headers = {"Authorization": f"Bearer {server.token}"}
    async with connect(server.ws, additional_headers=headers, max_size=None) as ws, httpx.AsyncClient(headers=headers) as http:
        sid = await _session(ws)
        uploaded = 0

        async def upload() -> str:  # a different 16x16 PNG each time (an attachment is one per content)
            nonlocal uploaded
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (uploaded % 256, uploaded // 256 % 256, 99)).save(buf, "PNG")
            uploaded += 1
            files = {"file": ("f.png", buf.getvalue(), "image/png")}
            r = await http.post(f"{server.http}/v1/sessions/{sid}/attachments", files=files)
            r.raise_for_status()
            return r.json()["id"]

        same = await upload() if images == "same" else None

        async def attachment() -> str | None:
            return await upload() if images == "new" else same

        async def turn(attached: str | None) -> float:
            if attached is None:
                return await timed_turn(ws, sid, MESSAGE)
            return await timed_turn(ws, sid, MESSAGE, attachment_ids=[attached], skill="chat")

        messages = 0
        for checkpoint in checkpoints:
            while messages < checkpoint:  # two messages a turn
                await turn(await attachment())
                messages += 2
            attached = [await attachment() for _ in range(probes)]  # uploaded before the clock starts
            cpu = server.cpu_s()
            ttfts = sorted([await turn(a) for a in attached])
            cpu = server.cpu_s() - cpu
            messages += 2 * probes
            out.append({
                "messages": checkpoint,
                "ttft_ms_p50": round(statistics.median(ttfts) * 1e3, 2),
                "ttft_ms_p90": round(ttfts[int(len(ttfts) * 0.9)] * 1e3, 2),
                "server_cpu_ms_per_turn": round(cpu * 1e3 / probes, 2),
            })  # fmt: skip
            print(server.name, out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[20, 1000, 2000], help="session lengths, in messages")
    ap.add_argument("--probes", type=int, default=20, help="turns timed at each checkpoint")
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--images", choices=["none", "same", "new"], default="none", help="what each turn names")
    ap.add_argument("--port", type=int, default=8936)
    ap.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="long-session-"))
    result: dict = {
        **stamp(),
        "cpus": psutil.cpu_count(),
        "reply_words": 300,
        "message_words": 40,
        "images": args.images,
        "workdir": str(workdir),
        "runs": {},
    }
    for name in args.configs:
        flood = ["--mode", "flood", "--flood-words", "300", "--device", "cpu", *CONFIGS[name]]
        server = ServerProcess(name, flood, workdir, args.port)
        try:
            result["runs"][name] = asyncio.run(grow(server, sorted(args.checkpoints), args.probes, args.images))
        finally:
            server.stop()
    if {"window", "whole"} <= set(result["runs"]):
        result["whole_over_window_cpu"] = [
            round(b["server_cpu_ms_per_turn"] / a["server_cpu_ms_per_turn"], 2)
            for a, b in zip(result["runs"]["window"], result["runs"]["whole"])
        ]
    emit(result, args.out)


if __name__ == "__main__":
    main()
