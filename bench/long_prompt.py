"""A long prompt arrives while other replies stream: computed whole, or in pieces (``chat_prefill_chunk``).

``--streams`` conversations start replies and stream; once each has ``--warm`` tokens, ``--burst``
new conversations send a long message each at once (a pasted document, ``--long-tokens`` tokens of
prompt), and ``--late-ms`` later another sends a short one. Measured, as the chat process reads
the outputs:

- the streaming replies' gaps between tokens while the long prompts are read (from their send to
  the last one's first token): their longest, p95 and median, and how many tokens they got meanwhile;
- the long prompts' times to first token (the mean and the longest), and the short one's.

With the prompts computed whole (``--chunk 0``) and in pieces of ``--chunk`` tokens, alternating,
``--rounds`` times each, in one run. Greedy decoding: the replies must be the same either way
(``replies_same``). ``--model`` takes a prepared model folder (the offline profile's SmolLM2-135M
is ``data/models/chat-smollm2-135m-instruct``); else a random-weight model of ``--shape`` is built.

    .venv/bin/python bench/long_prompt.py --model data/models/chat-smollm2-135m-instruct --streams 4 16 --out bench/results/long_prompt_cpu.json
    .venv/bin/python bench/long_prompt.py --model data/models/chat-smollm2-135m-instruct --streams 4 --burst 4 --long-tokens 240 \
      --out bench/results/long_prompt_burst_cpu.json   # four new 240-token prompts at once
    python3 bench/long_prompt.py --shape qwen2.5-0.5b --device cuda --streams 64 --chunk 1024 --out OUT/long_prompt_gpu.json  # GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.followups import SYSTEM, WORDS, message  # noqa: E402
from bench.load import summary  # noqa: E402
from bench.report import emit, stamp  # noqa: E402


def prompts(tokenizer, args: argparse.Namespace) -> tuple[list[list[int]], list[list[int]], list[int]]:  # noqa: ANN001
    """The streams' prompts, the long ones (at least ``--long-tokens`` each) and the late short one."""
    from skills.base import HistoryItem
    from skills.chat import build_prompt

    def ask(text: str) -> list[int]:
        return build_prompt(tokenizer, system=SYSTEM, history=[HistoryItem("user", text, 0)], budget=args.context)[0]

    rng = random.Random(0)
    streams = [ask(f"{k}. {message(rng, 12)}") for k in range(max(args.streams))]
    longs = []
    for k in range(args.burst):
        words = [f"{k}. Summarise these notes:"]
        while len(ask(" ".join(words))) < args.long_tokens:
            words.extend(rng.choice(WORDS) for _ in range(10))
        longs.append(ask(" ".join(words)))
    return streams, longs, ask(f"0. {message(rng, 12)}")


def run(model_dir: Path, args: argparse.Namespace, streams: int, chunk: int) -> dict:
    from skills.chat_worker import ChatWorker, ChatWorkerOptions

    worker = ChatWorker(ChatWorkerOptions(
        model=str(model_dir), device=args.device, max_new_tokens=args.max_new, engine="slots",
        slots=streams + args.burst + 1, context_tokens=args.context, prefill_chunk=chunk,
    ))  # fmt: skip
    worker.load()
    manager = worker._manager
    asks, longs, late = prompts(worker.tokenizer, args)
    ids = [f"s{k}" for k in range(streams)]
    long_ids = [f"long{k}" for k in range(len(longs))]
    times: dict[str, list[float]] = {rid: [] for rid in [*ids, *long_ids, "late"]}
    tokens: dict[str, list[int]] = {}
    sent: dict[str, float] = {}

    def read() -> None:
        out = manager.get_result(timeout=0.5)
        if out is None:
            return
        now = time.perf_counter()
        got = out.generated_tokens
        times[out.request_id].extend([now] * (len(got) - len(tokens.get(out.request_id, ()))))  # a step's tokens at once
        tokens[out.request_id] = list(got)
        if out.error:
            raise SystemExit(f"{out.request_id} failed: {out.error}")

    try:
        for rid, ask in zip(ids, asks):
            manager.add_request(input_ids=ask, request_id=rid, max_new_tokens=args.max_new)
        while any(len(times[rid]) < args.warm for rid in ids):
            read()
        sent["long"] = time.perf_counter()
        for rid, long in zip(long_ids, longs):
            manager.add_request(input_ids=long, request_id=rid, max_new_tokens=args.reply_tokens)
        while time.perf_counter() < sent["long"] + args.late_ms / 1000:
            read()
        sent["late"] = time.perf_counter()
        manager.add_request(input_ids=late, request_id="late", max_new_tokens=args.reply_tokens)
        while any(len(times[rid]) < args.reply_tokens for rid in [*long_ids, "late"]):
            read()
        for rid in ids:
            manager.cancel_request(rid)
    finally:
        worker.close()
    firsts = [(times[rid][0] - sent["long"]) * 1000 for rid in long_ids]
    window = (sent["long"], max(times[rid][0] for rid in long_ids))
    gaps, during = [], []
    for rid in ids:
        inside = [t for t in times[rid] if window[0] <= t <= window[1]]
        before = [t for t in times[rid] if t < window[0]][-1:]  # the gap from the last token before the send
        edges = before + inside + [t for t in times[rid] if t > window[1]][:1]
        gaps += [(b - a) * 1000 for a, b in zip(edges, edges[1:]) if b > a]
        during.append(len(inside))
    return {
        "chunk": chunk,
        "streams": streams,
        "long_prompt_tokens": [len(p) for p in longs],
        "stream_gap_ms": {**summary(gaps), "p50": round(statistics.median(gaps), 1) if gaps else None},
        "stream_tokens_while_read": {"min": min(during), "mean": round(statistics.mean(during), 1)},
        "long_ttft_ms": {"mean": round(statistics.mean(firsts), 1), "max": round(max(firsts), 1)},
        "late_ttft_ms": round((times["late"][0] - sent["late"]) * 1000, 1),
        "replies": {rid: tokens[rid] for rid in [*long_ids, "late"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a prepared model folder (else a random model of --shape)")
    ap.add_argument("--shape", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", type=int, nargs="+", default=[4, 16], help="replies streaming when the long prompt comes")
    ap.add_argument("--chunk", type=int, default=256, help="the piece size compared with whole prompts (chat_prefill_chunk)")
    ap.add_argument("--burst", type=int, default=1, help="new conversations that send a long prompt at once")
    ap.add_argument("--long-tokens", type=int, default=1800, help="each long prompt's length, at least")
    ap.add_argument("--late-ms", type=float, default=100, help="the short prompt comes this long after the long one")
    ap.add_argument("--warm", type=int, default=4, help="tokens each stream has before the long prompt comes")
    ap.add_argument("--max-new", type=int, default=512, help="the streams' reply limit (they are cancelled at the end)")
    ap.add_argument("--reply-tokens", type=int, default=4, help="tokens the long and the late prompt's replies run to")
    ap.add_argument("--context", type=int, default=2048, help="the prompt budget (chat_context_tokens)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from bench.chat_model import build_chat_model

        model = build_chat_model(Path(tempfile.mkdtemp()) / "chat-model", args.shape)
    results = []
    for streams in args.streams:
        runs = [run(model, args, streams, chunk) for _ in range(args.rounds) for chunk in (args.chunk, 0)]
        by = {chunk: [r for r in runs if r["chunk"] == chunk] for chunk in (args.chunk, 0)}

        def median(chunk: int, key: str, field: str | None = None) -> float:
            return statistics.median(r[key][field] if field else r[key] for r in by[chunk])

        results.append({
            "streams": streams,
            "replies_same": all(r["replies"] == runs[0]["replies"] for r in runs),
            **{name: {"pieces": median(args.chunk, key, field), "whole": median(0, key, field)} for name, key, field in (
                ("stream_gap_max_ms", "stream_gap_ms", "max"),
                ("stream_gap_p95_ms", "stream_gap_ms", "p95"),
                ("long_ttft_mean_ms", "long_ttft_ms", "mean"),
                ("long_ttft_max_ms", "long_ttft_ms", "max"),
                ("late_ttft_ms", "late_ttft_ms", None),
            )},
            "runs": [{k: v for k, v in r.items() if k != "replies"} for r in runs],
        })  # fmt: skip
    config = {k: getattr(args, k) for k in ("shape", "device", "chunk", "burst", "long_tokens", "late_ms", "context")}
    emit({**stamp(), **config, "model": str(args.model or args.shape), "results": results}, args.out)


if __name__ == "__main__":
    main()
