"""How long building a chat prompt holds the event loop as a conversation outgrows the budget.

Every chat turn templates and tokenizes its history on the web process's event loop
(``skills.chat.build_prompt``). Measured here against the rule it implements done one message at a
time (template, drop the oldest, template again), in the same run: conversations of 21 to 201
messages over a 2,048-token budget, the benchmark's byte-level tokenizer with a ChatML template.

    .venv/bin/python bench/prompt_build.py --out bench/results/prompt_build_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skills.base import HistoryItem  # noqa: E402
from skills.chat import build_prompt  # noqa: E402
from tests.tiny_models import build_chat_tokenizer  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog and keeps running far away "


def one_at_a_time(tokenizer, system: str | None, history: list[HistoryItem], budget: int) -> tuple[list[int] | None, int | None]:  # noqa: ANN001
    """The same rule, one dropped message per template: drop the oldest, then any assistant message
    left first. (None, None) when the last message alone does not fit."""
    head = [{"role": "system", "content": system}] if system else []
    msgs = [{"role": h.role, "content": h.text} for h in history]
    dropped = 0
    while True:
        ids = list(tokenizer.apply_chat_template(head + msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
        if len(ids) <= budget:
            return ids, dropped
        if len(msgs) <= 1:
            return None, None
        msgs.pop(0)
        dropped += 1
        while len(msgs) > 1 and msgs[0]["role"] == "assistant":
            msgs.pop(0)
            dropped += 1


def best_ms(fn, repeats: int) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--messages", type=int, nargs="*", default=[5, 21, 61, 201])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_chat_tokenizer(Path(tmp), 151936)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    history = []
    for i in range(max(args.messages) // 2):
        history += [HistoryItem("user", f"question {i}: " + WORDS * 2), HistoryItem("assistant", f"answer {i}: " + WORDS * 4)]
    history.append(HistoryItem("user", "and now?"))
    system = "You are a helpful assistant."
    rows = []
    for n in args.messages:
        h = history[-n:]
        ids, dropped = build_prompt(tokenizer, system=system, history=h, budget=args.budget)
        assert (ids, dropped) == one_at_a_time(tokenizer, system, h, args.budget)
        ours = best_ms(lambda: build_prompt(tokenizer, system=system, history=h, budget=args.budget), args.repeats)  # noqa: B023
        slow = best_ms(lambda: one_at_a_time(tokenizer, system, h, args.budget), args.repeats)  # noqa: B023
        rows.append({"messages": n, "prompt_tokens": len(ids), "dropped": dropped, "ms": ours, "one_at_a_time_ms": slow,
                     "speedup": round(slow / ours, 1)})  # fmt: skip
        print(rows[-1], flush=True)
    result = {"command": "python bench/prompt_build.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "budget": args.budget, "runs": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
