"""The load generator: N concurrent websocket sessions as real clients of the documented protocol.

Each client connects, creates a session, waits at a barrier so every turn is sent at once, then
records when its turn was sent, when each ``response.delta`` frame arrived and what
``response.done`` reported. Turns still running at ``cap_s`` are cancelled (the naive baseline
serves one at a time, so its queue would otherwise take minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from websockets.asyncio.client import connect

PROMPT = (
    "You are helping a small team plan their week. Summarise the following notes into a short list of "
    "action items with owners and dates, then suggest one improvement to how the team works: "
    "Monday standup ran long; the release checklist is missing the database backup step; Ana owns the "
    "billing page; Tom is out Thursday; the design review moved to Friday afternoon."
)


_NUMBERS = itertools.count(1)


@dataclass
class Stream:
    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    frames: list[float] = field(default_factory=list)
    tokens: int = 0
    status: str = ""


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 3)


def summary(values: list[float]) -> dict[str, float | None]:
    return {"p50": pct(values, 50), "p95": pct(values, 95), "max": pct(values, 100)}


async def _session(ws) -> str:  # noqa: ANN001
    await ws.recv()  # server.hello
    await ws.send(json.dumps({"type": "session.create", "event_id": "s"}))
    while (ev := json.loads(await ws.recv()))["type"] != "session.created":
        pass
    return ev["session_id"]


async def timed_turn(ws, sid: str, text: str, **fields: object) -> float:  # noqa: ANN001
    """Send one turn (``fields`` added to its event) on an open connection and wait for its reply;
    returns its time to first token (s)."""
    sent, first = time.perf_counter(), None
    await ws.send(json.dumps({"type": "turn.create", "session_id": sid, "text": text, "event_id": "t", **fields}))
    while True:
        raw = await ws.recv()
        if first is None and '"response.delta"' in raw[:64]:
            first = time.perf_counter() - sent
        if '"response.done"' in raw[:64]:
            return first


async def _client(url: str, token: str, text: str, ready: asyncio.Queue, go: asyncio.Event, cap_s: float) -> Stream:
    st = Stream()
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None) as ws:
        sid = await _session(ws)
        ready.put_nowait(1)
        await go.wait()
        st.sent = time.perf_counter()
        await ws.send(json.dumps({"type": "turn.create", "session_id": sid, "text": text, "event_id": "t"}))
        turn_id = None
        deadline = st.sent + cap_s
        cancelled = False
        while True:
            timeout = deadline - time.perf_counter()
            if timeout <= 0 and not cancelled and turn_id:
                cancelled = True
                await ws.send(json.dumps({"type": "response.cancel", "session_id": sid, "turn_id": turn_id}))
                timeout = 60
            try:
                raw = await asyncio.wait_for(ws.recv(), max(timeout, 0.001))
            except TimeoutError:
                continue
            now = time.perf_counter()
            if '"response.delta"' in raw[:64]:
                st.frames.append(now)
                if st.first is None:
                    st.first = now
                continue
            ev = json.loads(raw)
            if ev["type"] == "turn.created":
                turn_id = ev["turn_id"]
            elif ev["type"] == "error":
                raise RuntimeError(f"server error: {ev}")
            elif ev["type"] == "response.done":
                st.done, st.status = now, ev["status"]
                st.tokens = int((ev.get("usage") or {}).get("completion_tokens") or 0)
                return st


async def chat_load(url: str, token: str, sessions: int, *, cap_s: float = 600.0, text: str = PROMPT) -> dict:
    """Run ``sessions`` concurrent turns and measure what the clients saw. This process's garbage
    collector is off from the send to the last reply: with torch and transformers loaded here (the
    harness builds the model), one full collection stopped every client for 135-150 ms on the
    2-core CPU, inside a burst, where it would count as the server's latency."""
    ready: asyncio.Queue = asyncio.Queue()
    go = asyncio.Event()
    # Each message is its own from its first word (a number never sent before), as different people's
    # are: the same text in every new session would let a burst reuse the slots of the one before.
    tasks = [asyncio.create_task(_client(url, token, f"{next(_NUMBERS)}. {text}", ready, go, cap_s)) for _ in range(sessions)]
    for _ in range(sessions):
        await ready.get()
    collecting = gc.isenabled()
    gc.disable()
    try:
        go.set()
        streams: list[Stream] = await asyncio.gather(*tasks)
    finally:
        if collecting:
            gc.enable()
    return stream_stats(streams, cap_s)


def stream_stats(streams: list[Stream], cap_s: float) -> dict:
    start = min(s.sent for s in streams)
    end = max(s.done or s.sent for s in streams)
    wall = end - start
    tokens = sum(s.tokens for s in streams)
    frames = sum(len(s.frames) for s in streams)
    # A turn that never streamed before the cap counts with the cap as its TTFT (a lower bound).
    ttft = [((s.first if s.first is not None else s.sent + cap_s) - s.sent) * 1000 for s in streams]
    tpot = [(s.done - s.first) * 1000 / (s.tokens - 1) for s in streams if s.first and s.done and s.tokens > 1]
    gaps = [(b - a) * 1000 for s in streams for a, b in zip(s.frames, s.frames[1:])]
    return {
        "sessions": len(streams),
        "completed": sum(s.status == "completed" for s in streams),
        "cancelled_at_cap": sum(s.status == "cancelled" for s in streams),
        "never_started": sum(s.first is None for s in streams),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "per_stream_tokens_per_s": summary([1000 / t for t in tpot]) if tpot else None,
        "ttft_ms": summary(ttft),
        "tpot_ms": summary(tpot),
        "frame_gap_ms": summary(gaps),
        "frames": frames,
        "frames_per_s": round(frames / wall, 1) if wall > 0 else None,
        "tokens_per_frame": round(tokens / frames, 2) if frames else None,
    }


async def idle_sessions(url: str, token: str, n: int, hold_s: float = 1.0) -> list:
    """Open ``n`` websocket sessions (connected, one chat session each) and keep them open; returns
    the open connections (close them with ``close_all``)."""
    sem = asyncio.Semaphore(64)

    async def one() -> object:
        async with sem:
            ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None)
            await _session(ws)
            return ws

    conns = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(hold_s)
    return list(conns)


async def close_all(conns: list) -> None:
    await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def server_metrics(http: str) -> dict:
    """What a run is judged by from the server's /metrics (cumulative): the event-loop lag histogram
    {upper bound (s): count}, per TTFT stage of chat turns (seconds summed, count), the web process's
    full garbage collections (seconds summed, count), and, where chat goes first on a shared GPU, the
    speech and vision steps that waited for chat prefill (count, seconds)."""
    from prometheus_client.parser import text_string_to_metric_families

    lag: dict[str, float] = {}
    stages: dict[str, list[float]] = {}
    held: dict[str, float] = {}
    full_gc = [0.0, 0.0]  # the web process's full garbage collections: seconds summed, count
    for fam in text_string_to_metric_families(httpx.get(f"{http}/metrics", timeout=30).text):
        if fam.name.startswith("assistant_media_chat_first"):
            held[fam.name] = fam.samples[0].value
        elif fam.name == "assistant_gc_pause_seconds":
            for s in fam.samples:
                if s.labels.get("generation") == "2" and s.name.endswith(("_sum", "_count")):
                    full_gc[s.name.endswith("_count")] = s.value
        elif fam.name == "assistant_event_loop_lag_seconds":
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    lag[s.labels["le"]] = s.value
        elif fam.name == "assistant_ttft_stage_seconds":
            for s in fam.samples:
                if s.labels.get("skill") == "chat" and s.name.endswith(("_sum", "_count")):
                    stages.setdefault(s.labels["stage"], [0.0, 0.0])[s.name.endswith("_count")] = s.value
    out: dict = {"lag": lag, "stages": stages, "full_gc": full_gc}
    if held:
        out["media_held"] = (held.get("assistant_media_chat_first_holds", 0.0), held.get("assistant_media_chat_first_held_seconds", 0.0))
    return out


def between(before: dict, after: dict) -> dict:
    """The run between two ``server_metrics`` scrapes: its loop lag (``lag_between``), the mean
    milliseconds of each TTFT stage of its chat turns (where their time to first frame went), the
    web process's full garbage collections and the time they stopped it, and what media held."""
    stages = {}
    for stage, (total, n) in after["stages"].items():
        total0, n0 = before["stages"].get(stage, (0.0, 0.0))
        if n > n0:
            stages[stage] = round((total - total0) * 1e3 / (n - n0), 2)
    out: dict = {"loop_lag": lag_between(before["lag"], after["lag"])}
    if stages:
        out["ttft_stages_ms"] = stages
    (s0, n0), (s1, n1) = before.get("full_gc", (0.0, 0.0)), after.get("full_gc", (0.0, 0.0))
    out["full_gc"] = {"collections": int(n1 - n0), "ms": round((s1 - s0) * 1e3, 1)}  # the web process stopped this long
    if "media_held" in after:  # chat first: what the media models waited for chat prefill
        (n0, s0), (n, s) = before.get("media_held", (0.0, 0.0)), after["media_held"]
        out["media_held"] = {"steps": int(n - n0), "ms": round((s - s0) * 1e3, 1)}
    return out


def lag_between(before: dict[str, float], after: dict[str, float]) -> dict:
    """Summarise the probes taken between two scrapes: count, share over 25 ms, and the bucket that
    holds the 99th percentile."""
    diff = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = diff.get("+Inf", 0)
    if not total:
        return {"probes": 0}
    bounds = sorted((float(le), n) for le, n in diff.items())
    p99 = next(le for le, n in bounds if n >= 0.99 * total)
    over = total - diff.get("0.025", 0)
    return {"probes": int(total), "p99_ms_at_most": None if p99 == float("inf") else p99 * 1000, "share_over_25ms": round(over / total, 4)}


async def _speech_client(url: str, token: str, pcm: bytes, stop: asyncio.Event, latencies: list[float]) -> None:
    """Speak ``pcm`` (PCM16, 16 kHz) over and over in review mode (transcripts only, no chat turn)."""
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None) as ws:
        sid = await _session(ws)
        while not stop.is_set():
            await ws.send(json.dumps({"type": "audio.start", "session_id": sid, "review": True}))
            for i in range(0, len(pcm), 32000):  # one second per frame
                await ws.send(pcm[i : i + 32000])
            t = time.perf_counter()
            await ws.send(json.dumps({"type": "audio.commit", "session_id": sid}))
            while (ev := json.loads(await ws.recv()))["type"] not in ("transcript.final", "error"):
                pass
            if ev["type"] == "error":
                raise RuntimeError(f"speech error: {ev}")
            latencies.append((time.perf_counter() - t) * 1000)


async def _vision_client(http: str, url: str, token: str, image: bytes, stop: asyncio.Event, latencies: list[float]) -> None:
    """Upload ``image`` once, then ask for its caption over and over."""
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(url, additional_headers=headers, max_size=None) as ws:
        sid = await _session(ws)
        async with httpx.AsyncClient(headers=headers, timeout=60) as client:
            r = await client.post(f"{http}/v1/sessions/{sid}/attachments", files={"file": ("photo.jpg", image, "image/jpeg")})
            r.raise_for_status()
            att = r.json()["id"]
        while not stop.is_set():
            t = time.perf_counter()
            turn = {"type": "turn.create", "session_id": sid, "text": "What is in this picture?", "attachment_ids": [att], "skill": "caption"}
            await ws.send(json.dumps(turn))
            while (ev := json.loads(await ws.recv()))["type"] not in ("response.done", "error"):
                pass
            if ev["type"] == "error" or ev["status"] != "completed":
                raise RuntimeError(f"vision turn failed: {ev}")
            latencies.append((time.perf_counter() - t) * 1000)


async def until(done: Callable[[], bool], tasks: list[asyncio.Task], poll: float = 0.05) -> None:
    """Wait until ``done()``, raising the error of any of ``tasks`` (clients) that failed meanwhile."""
    while not done():
        await asyncio.sleep(poll)
        for task in tasks:
            if task.done() and task.exception():
                raise task.exception()


def median_round(runs: list[dict]) -> dict:
    """Of several ``chat_load`` rounds, the one with the median TTFT p95 (the upper median), with
    every round's p95 added as ``ttft_p95_rounds_ms`` (and, where the rounds have them, each
    round's server figures as ``server_rounds``)."""
    ranked = sorted(runs, key=lambda r: r["ttft_ms"]["p95"])
    out = {**ranked[len(ranked) // 2], "ttft_p95_rounds_ms": [r["ttft_ms"]["p95"] for r in runs]}
    out.pop("server", None)
    if all("server" in r for r in runs):
        out["server_rounds"] = [r["server"] for r in runs]
    return out


async def chat_rounds(url: str, token: str, sessions: int, rounds: int, *, http: str | None = None) -> dict:
    """``rounds`` bursts of ``sessions`` chat turns, one after another: ``median_round`` of them.
    Given the server's ``http`` address, each round also gets what the server saw during it
    (``between`` two scrapes of /metrics, taken outside the timed bursts)."""
    runs = []
    before = await asyncio.to_thread(server_metrics, http) if http else None
    for _ in range(rounds):
        run = await chat_load(url, token, sessions)
        if http:  # one scrape ends this round and begins the next
            after = await asyncio.to_thread(server_metrics, http)
            run["server"], before = between(before, after), after
        runs.append(run)
    return median_round(runs)


async def chat_with_media(
    http: str, url: str, token: str, sessions: int, *, speech_streams: int, vision_streams: int, pcm: bytes, image: bytes,
    rounds: int = 1,
) -> dict:
    """``sessions`` chat turns at once (``rounds`` times) while speech and vision clients keep their
    skills busy. The media clients run in a process of their own, as other people's machines would:
    on this process's event loop their frames would delay the chat clients' clocks."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    media = ctx.Process(target=media_clients, args=(theirs, http, url, token, speech_streams, vision_streams, pcm, image))
    media.start()
    try:
        if not await asyncio.to_thread(ours.poll, 180):
            raise RuntimeError("the media clients did not reach a steady load in 180 s")
        steady = ours.recv()
        if steady[0] == "error":
            raise RuntimeError(f"media client failed: {steady[1]}")
        chat = await chat_rounds(url, token, sessions, rounds, http=http)
        ours.send("stop")
        kind, *rest = await asyncio.to_thread(ours.recv)
        if kind == "error":
            raise RuntimeError(f"media client failed: {rest[0]}")
    finally:
        if media.is_alive():
            with contextlib.suppress(OSError):
                ours.send("stop")  # a no-op once stopped; unblocks it when a chat round failed
        media.join(60)
        if media.is_alive():
            media.kill()
    speech_ms, vision_ms, during = rest
    return {
        "chat": chat,
        "speech_utterances_during_chat": during[0],
        "vision_turns_during_chat": during[1],
        "speech_latency_ms": summary(speech_ms),
        "vision_latency_ms": summary(vision_ms),
    }


def media_clients(  # noqa: PLR0913
    conn, http: str, url: str, token: str, speech_streams: int, vision_streams: int, pcm: bytes, image: bytes  # noqa: ANN001
) -> None:
    """The media side of ``chat_with_media``, in its own process: start the clients, send
    ``("steady",)`` once each has finished one request, run until ``"stop"`` arrives, then send
    ``("done", speech latencies, vision latencies, (speech, vision) requests finished between the
    two)``; ``("error", message)`` instead when a client fails."""

    async def main() -> None:
        stop = asyncio.Event()
        speech_ms: list[float] = []
        vision_ms: list[float] = []
        tasks = [asyncio.create_task(_speech_client(url, token, pcm, stop, speech_ms)) for _ in range(speech_streams)]
        tasks += [asyncio.create_task(_vision_client(http, url, token, image, stop, vision_ms)) for _ in range(vision_streams)]
        # Every media client has finished one request: the load is steady.
        await until(lambda: len(speech_ms) >= speech_streams and len(vision_ms) >= vision_streams, tasks)
        counts = len(speech_ms), len(vision_ms)
        conn.send(("steady",))
        await asyncio.to_thread(conn.recv)
        during = len(speech_ms) - counts[0], len(vision_ms) - counts[1]
        stop.set()
        await asyncio.gather(*tasks)
        conn.send(("done", speech_ms, vision_ms, during))

    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
