"""Multi-turn conversations through the slot engine, with and without prefix reuse.

``--sessions`` conversations take ``--turns`` turns each; each turn of every conversation is sent at
once (a burst), and the next turn's prompt is built as the server builds it (``skills.chat.build_prompt``:
the chat template over the history, each reply as its decoded text, the oldest messages dropped
past ``--context`` tokens, keeping the start of the turn before while it fits, as ``ChatSkill``
does). Per turn: time to first token (request queued to its first token, read as the chat process
reads it), prompt tokens, and how many of them the model computed and how many
it read from the slot that held the conversation's previous turn (``skills/prefix_cache.py``).
With ``chat_prefix_reuse`` on and off, alternating, ``--rounds`` times each, in one run; the replies
must be the same either way (``replies_same``).

    .venv/bin/python bench/followups.py --shape small --device cpu --sessions 1 4 --out bench/results/followups_cpu.json
    python3 bench/followups.py --shape qwen2.5-0.5b --device cuda --sessions 1 64 --out OUT/followups_gpu.json  # GPU
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

from bench.load import summary  # noqa: E402
from bench.report import emit, stamp  # noqa: E402

SYSTEM = "You are a helpful assistant."
WORDS = (
    "plan release notes budget owner review design meeting page billing backup checklist team week date "
    "standup friday draft summary customer ticket deploy server cost risk goal"
).split()


def message(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "?"


def run(model_dir: Path, args: argparse.Namespace, sessions: int, reuse: bool) -> dict:
    from skills.base import HistoryItem
    from skills.chat import DROP_HEADROOM, build_prompt
    from skills.chat_worker import ChatWorker, ChatWorkerOptions

    worker = ChatWorker(ChatWorkerOptions(
        model=str(model_dir), device=args.device, max_new_tokens=args.max_new, engine="slots",
        slots=max(sessions, 4), context_tokens=args.context, prefix_reuse=reuse,
    ))  # fmt: skip
    worker.load()
    manager, tokenizer = worker._manager, worker.tokenizer
    rng = random.Random(0)  # the same messages either way
    histories: list[list] = [[] for _ in range(sessions)]
    starts: list[int | None] = [None] * sessions  # where each prompt started, once it dropped messages (as ChatSkill keeps)
    turns = []
    try:
        for turn in range(args.turns):
            prompts = []
            for s, history in enumerate(histories):
                history.append(HistoryItem("user", message(rng, args.words), len(history)))
                ids, dropped = build_prompt(
                    tokenizer, system=SYSTEM, history=history, budget=args.context,
                    **({"keep_from": starts[s], "headroom": DROP_HEADROOM} if args.keep_start == "on" else {}),
                )  # fmt: skip
                starts[s] = history[dropped].position if dropped else None
                prompts.append(ids)
            before = worker.prompt_tokens()
            sent, first, done = {}, {}, {}
            for s, ids in enumerate(prompts):
                rid = f"s{s}-t{turn}"
                sent[rid] = time.perf_counter()
                manager.add_request(input_ids=ids, request_id=rid, max_new_tokens=args.max_new)
            while len(done) < sessions:
                out = manager.get_result(timeout=1.0)
                if out is None:
                    continue
                first.setdefault(out.request_id, time.perf_counter())
                if out.is_finished():
                    done[out.request_id] = list(out.generated_tokens)
            computed, reused = (a - b for a, b in zip(worker.prompt_tokens(), before))
            for s, history in enumerate(histories):
                text = tokenizer.decode(done[f"s{s}-t{turn}"], skip_special_tokens=True)
                history.append(HistoryItem("assistant", text, len(history)))
            turns.append({
                "turn": turn + 1,
                "prompt_tokens_mean": round(statistics.mean(map(len, prompts)), 1),
                "computed": computed,
                "reused": reused,
                "ttft_ms": summary([(first[r] - sent[r]) * 1000 for r in sent]),
            })  # fmt: skip
    finally:
        worker.close()
    return {"reuse": reuse, "sessions": sessions, "turns": turns, "replies": [[h.text for h in hs[1::2]] for hs in histories]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--words", type=int, default=12, help="words in each user message")
    ap.add_argument("--max-new", type=int, default=96, help="tokens in each reply")
    ap.add_argument("--context", type=int, default=2048, help="the prompt budget (chat_context_tokens)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep-start", choices=["on", "off"], default="on",
                    help="past the budget, keep the turn before's start while it fits (as the server does); off: drop to fit")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from bench.chat_model import build_chat_model

    model = build_chat_model(Path(tempfile.mkdtemp()) / "chat-model", args.shape)
    results = []
    for sessions in args.sessions:
        runs = [run(model, args, sessions, reuse) for _ in range(args.rounds) for reuse in (True, False)]
        by = {reuse: [r for r in runs if r["reuse"] is reuse] for reuse in (True, False)}

        def last_p50(reuse: bool) -> float:  # the last turn's median TTFT, median over the rounds
            return statistics.median(r["turns"][-1]["ttft_ms"]["p50"] for r in by[reuse])

        results.append({
            "sessions": sessions,
            "replies_same": all(r["replies"] == runs[0]["replies"] for r in runs),
            "last_turn_prompt_tokens": runs[0]["turns"][-1]["prompt_tokens_mean"],
            "last_turn_ttft_p50_ms": {"reuse": last_p50(True), "no_reuse": last_p50(False)},
            "last_turn_ttft_ratio": round(last_p50(False) / last_p50(True), 2),
            "prompt_tokens_computed": {
                name: sum(t["computed"] for t in by[k][0]["turns"]) for name, k in (("reuse", True), ("no_reuse", False))
            },
            "prompt_tokens_reused": sum(t["reused"] for t in by[True][0]["turns"]),
            "runs": [{k: v for k, v in r.items() if k != "replies"} for r in runs],
        })  # fmt: skip
    config = {k: getattr(args, k) for k in ("shape", "device", "turns", "words", "max_new", "context", "keep_start")}
    emit({**stamp(), **config, "results": results}, args.out)


if __name__ == "__main__":
    main()
