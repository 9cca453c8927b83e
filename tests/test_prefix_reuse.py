"""A conversation's next turn is computed from where its previous turn left off: the slot that
served that turn still holds its keys and values, so only the new tokens go through the model
(skills/prefix_cache.py, ``SlotEngine.extend``). Every reply is still exactly what transformers'
own ``generate`` gives for the whole prompt; other conversations do not push a live one out; a
cancelled reply, a request moved between slots and a new conversation all leave the cache right."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from skills.chat_worker import ChatWorker, ChatWorkerOptions
from skills.prefix_cache import BLOCK, PrefixIndex, chain
from tests.conftest import make_settings, start_server, wait_ready, ws_client
from tests.tiny_models import build_tiny_chat_model

FIRST = list(range(10, 70))  # conversation A's first prompt: 60 tokens
OTHER = [3, 17, 90, 4] * 12  # conversation B's
NEW = [5, 6, 7, 8, 9, 11]  # a new message and its template


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("reuse-chat"), layers=3, hidden=64, weight_std=0.35)


@pytest.fixture(scope="module")
def generate(model_dir: Path):  # noqa: ANN201
    """Greedy continuation from transformers' own ``generate`` over the whole prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def run(prompt: list[int], n: int) -> list[int]:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, len(prompt) :].tolist()

    return run


def load(model_dir: Path, **options: object) -> ChatWorker:
    worker = ChatWorker(ChatWorkerOptions(model=str(model_dir), device="cpu", max_new_tokens=64, context_tokens=256,
                                          engine="slots", **options))  # fmt: skip
    worker.load()
    assert worker.engine == "slots"
    return worker


def reply(worker: ChatWorker, prompt: list[int], rid: str, n: int, *, cancel_after: int | None = None) -> list[int]:
    """Run one request to its end (or cancel it once it has ``cancel_after`` tokens); its tokens."""
    manager = worker._manager
    manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=n)
    deadline, tokens = time.monotonic() + 60, []
    while True:
        assert time.monotonic() < deadline, f"{rid} timed out with {tokens}"
        out = manager.get_result(timeout=0.05)
        if out is None or out.request_id != rid:
            continue
        assert out.error is None
        tokens = list(out.generated_tokens)
        if out.is_finished():
            return tokens
        if cancel_after is not None and len(tokens) >= cancel_after:
            manager.cancel_request(rid)
            time.sleep(0.2)
            while manager.get_result(timeout=0.05) is not None:  # the step in flight's token, dropped
                pass
            return tokens


def finished(worker: ChatWorker, n: int) -> dict[str, list[int]]:
    """Read outputs until ``n`` requests have finished; each one's tokens."""
    done: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    while len(done) < n:
        assert time.monotonic() < deadline, done
        out = worker._manager.get_result(timeout=0.05)
        if out is not None and out.is_finished():
            done[out.request_id] = list(out.generated_tokens)
    return done


def counts(worker: ChatWorker) -> tuple[int, int]:
    return worker.prompt_tokens()


@pytest.mark.parametrize(
    ("replay", "fused"), [(False, True), (True, True), (False, False)], ids=["eager", "replayed", "model-decoder"]
)
def test_the_next_turn_computes_only_its_new_tokens_and_replies_as_generate_does(
    model_dir: Path, generate, replay: bool, fused: bool  # noqa: ANN001
) -> None:
    """Three turns of one conversation: the second and third compute their new message and the
    previous reply's last token, not the history; each reply is ``generate``'s for the whole prompt.
    ``replayed`` runs every step through the graph capture and replay path (its CPU stand-in),
    captured at load as on a GPU."""
    worker = load(model_dir, slots=4, fused_forward=fused)
    try:
        engine = worker._manager.engine
        engine.graphs.on = replay
        warmed = engine.warm(worker._manager.max_prefill_tokens)
        prompt, before = FIRST, counts(worker)
        previous: list[int] = []  # the turn before's prompt and reply
        last: list[int] = []
        assert before == (0, 0)
        for turn in range(3):
            got = reply(worker, prompt, f"a{turn}", 20)
            assert got == generate(prompt, 20), turn
            computed, reused = counts(worker)
            if turn == 0:
                assert (computed, reused) == (len(FIRST), 0)
            else:
                # The slot holds the previous prompt and every reply token but the last (never fed back).
                held = len(previous) + len(last) - 1
                assert reused - before[1] == held, turn
                assert computed - before[0] == len(prompt) - held == len(NEW) + 1, turn
            previous, last, before = prompt, got, (computed, reused)
            prompt = prompt + got + NEW
        if replay:
            assert "extend" in {key[0] for key in engine.graphs.keys()}
            assert len(engine.graphs.keys()) == warmed, "an extend step was first captured while serving"
    finally:
        worker.close()


def test_without_reuse_every_prompt_is_computed_whole(model_dir: Path, generate) -> None:  # noqa: ANN001
    worker = load(model_dir, slots=4, prefix_reuse=False)
    try:
        first = reply(worker, FIRST, "a0", 12)
        second = FIRST + first + NEW
        assert reply(worker, second, "a1", 12) == generate(second, 12)
        assert counts(worker) == (len(FIRST) + len(second), 0)
    finally:
        worker.close()


def test_a_new_conversation_takes_an_empty_slot_then_the_oldest(model_dir: Path, generate) -> None:  # noqa: ANN001
    """Two slots. A, then B (a new conversation: an empty slot, so A's turn stays), then A again
    (reused), then C, new, when both slots hold a conversation: C takes B's, left longer ago, so
    A's third turn is reused again, and B's next turn is computed whole (in C's slot, now the older)."""
    worker = load(model_dir, slots=2)
    try:
        turns = {"a": FIRST, "b": OTHER}
        got = {}

        def run(name: str, rid: str) -> int:
            """Run the conversation's next turn; the prompt tokens it reused."""
            before = counts(worker)[1]
            prompt = turns[name]
            got[name] = reply(worker, prompt, rid, 10)
            assert got[name] == generate(prompt, 10), rid
            turns[name] = prompt + got[name] + NEW
            return counts(worker)[1] - before

        assert run("a", "a0") == 0
        assert run("b", "b0") == 0
        assert run("a", "a1") == len(FIRST) + 9
        turns["c"] = [200, 100, 50, 25, 12, 6] * 4
        assert run("c", "c0") == 0
        assert run("a", "a2") == len(FIRST) + 10 + len(NEW) + 9, "C took A's slot, though B's was left longer ago"
        assert run("b", "b1") == 0
        assert run("a", "a3") > len(FIRST) + 20, "B's turn took A's slot, though C's was left longer ago"
    finally:
        worker.close()


def test_a_cancelled_reply_leaves_what_was_streamed_for_the_next_turn(model_dir: Path, generate) -> None:  # noqa: ANN001
    """Stopped mid-reply, the dialogue stores the text streamed so far; the next turn, holding it,
    reuses the prompt and those tokens (none the step in flight was computing), and its reply is
    ``generate``'s."""
    worker = load(model_dir, slots=2)
    try:
        streamed = reply(worker, FIRST, "a0", 60, cancel_after=8)
        assert 8 <= len(streamed) < 60 and streamed == generate(FIRST, len(streamed))
        before = counts(worker)[1]
        second = FIRST + streamed + NEW
        assert reply(worker, second, "a1", 15) == generate(second, 15)
        # The slot holds the tokens its scheduler had read, less the last: all that was streamed, or
        # all but the last of it when nothing more was read before the cancel.
        assert len(FIRST) + len(streamed) - 1 <= counts(worker)[1] - before <= len(FIRST) + len(streamed)
    finally:
        worker.close()


def test_a_reply_that_comes_back_as_other_tokens_still_reuses_the_prompt(model_dir: Path, generate) -> None:  # noqa: ANN001
    """A reply's text may encode to other ids than the model emitted; the next turn then shares only
    the previous prompt and the reply's first tokens with the slot, less than half of a long reply's
    slot, and is still its conversation's: it reuses what it shares."""
    worker = load(model_dir, slots=2)
    try:
        first = reply(worker, FIRST, "a0", 64)
        retokenized = [first[0], (first[1] + 1) % 250 + 3, *first[2:]]
        second = FIRST + retokenized + NEW
        before = counts(worker)[1]
        assert reply(worker, second, "a1", 10) == generate(second, 10)
        assert counts(worker)[1] - before == len(FIRST) + 1
    finally:
        worker.close()


def test_a_new_conversation_gets_a_long_shared_system_prompt_copied(model_dir: Path, generate) -> None:  # noqa: ANN001
    """Conversations that start with the same long system prompt: the second gets those tokens
    copied from the first one's slot into an empty one (the first keeps its own, and its next turn
    still reuses all of it). A shared start shorter than ``SHARE_MIN_TOKENS`` is computed."""
    from skills.slot_scheduler import SHARE_MIN_TOKENS

    worker = load(model_dir, slots=3)
    try:
        system = [(11 * i) % 250 + 3 for i in range(80)]
        a, b = system + [4, 5, 6, 7], system + [9, 8, 7, 6, 5]
        first = reply(worker, a, "a0", 10)
        before = counts(worker)
        assert reply(worker, b, "b0", 10) == generate(b, 10)
        assert (counts(worker)[0] - before[0], counts(worker)[1] - before[1]) == (len(b) - 80, 80)
        before = counts(worker)[1]
        second = a + first + NEW
        assert reply(worker, second, "a1", 10) == generate(second, 10)
        assert counts(worker)[1] - before == len(a) + 9, "A's slot was not kept"
        short = system[: SHARE_MIN_TOKENS - 1] + [200, 201, 202]
        before = counts(worker)[1]
        assert reply(worker, short, "c0", 10) == generate(short, 10)
        assert counts(worker)[1] == before
    finally:
        worker.close()


def test_a_follow_up_streams_before_new_prompts_admitted_with_it(model_dir: Path, generate) -> None:  # noqa: ANN001
    """A conversation's next turn and a new conversation admitted together: the next turn's few new
    tokens are computed first and its first token goes out before the new prompt's prefill runs."""
    from skills.slot_scheduler import _Request

    worker = load(model_dir, slots=4)
    manager, engine = worker._manager, worker._manager.engine
    try:
        first = reply(worker, FIRST, "a0", 10)
        out_before_prefill: list[set[str]] = []
        prefill = engine.prefill

        def watched(rows: list[int], prompts: list[list[int]]) -> list[int]:
            out_before_prefill.append({o.request_id for batch in list(manager._results.queue) for o in batch})
            return prefill(rows, prompts)

        engine.prefill = watched
        second = FIRST + first + NEW
        manager._commands.extend([  # admitted in the same turn of the scheduler's loop
            ("add", _Request("a1", second, 10, frozenset())),
            ("add", _Request("b0", OTHER, 10, frozenset())),
        ])  # fmt: skip
        manager._wake.set()
        done = finished(worker, 2)
        assert out_before_prefill == [{"a1"}], out_before_prefill
        assert done == {"a1": generate(second, 10), "b0": generate(OTHER, 10)}
    finally:
        worker.close()


def test_a_regenerated_reply_reuses_its_whole_prompt(model_dir: Path, generate) -> None:  # noqa: ANN001
    """The same prompt again (regenerate): all but its last token come from the slot."""
    worker = load(model_dir, slots=2)
    try:
        first = reply(worker, FIRST, "a0", 12)
        before = counts(worker)
        assert reply(worker, FIRST, "a0-again", 12) == first
        assert (counts(worker)[0] - before[0], counts(worker)[1] - before[1]) == (1, len(FIRST) - 1)
    finally:
        worker.close()


def test_moving_a_request_down_keeps_the_turn_a_free_slot_held(model_dir: Path, generate) -> None:  # noqa: ANN001
    """A's turn ends in slot 0. Six new requests take the empty slots 1-6; as they finish, those left
    in high slots move down into free ones, slot 0 among them: the move swaps rows, so A's turn
    moves up, and A's next turn still finds it."""
    worker = load(model_dir, slots=8)
    manager = worker._manager
    engine = manager.engine
    try:
        first = reply(worker, FIRST, "a0", 10)
        prompts = [[40 + i] * (6 + i) for i in range(6)]
        for i, p in enumerate(prompts):
            manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=4 + 2 * i if i < 5 else 40)
        done = finished(worker, 6)
        assert engine.moves > 0, "no request moved down"
        for i, p in enumerate(prompts):
            assert done[f"r{i}"] == generate(p, len(done[f"r{i}"])), i
        kept = manager._kept
        holds_a = [s for s in range(8) if s in kept and kept.length(s) == len(FIRST) + 9]
        assert holds_a and holds_a != [0], "A's turn did not move up"
        before = counts(worker)[1]
        second = FIRST + first + NEW
        assert reply(worker, second, "a1", 12) == generate(second, 12)
        assert counts(worker)[1] - before == len(FIRST) + 9
    finally:
        worker.close()


def test_a_burst_of_follow_ups_is_extended_together(model_dir: Path, generate) -> None:  # noqa: ANN001
    """Four conversations, then their next turns all at once: one extend step for the four, each
    from its own slot, and each reply is ``generate``'s."""
    worker = load(model_dir, slots=4)
    manager = worker._manager
    engine = manager.engine
    try:
        firsts = [[60 + k] + FIRST[k:] for k in range(4)]  # all different from their first token on
        replies = [reply(worker, p, f"c{k}-0", 8) for k, p in enumerate(firsts)]
        calls: list[int] = []
        extend = engine.extend

        def counted(rows: list[int], prompts: list[list[int]], starts: list[int], **kw: object) -> list[int]:
            calls.append(len(prompts))
            return extend(rows, prompts, starts, **kw)

        engine.extend = counted
        seconds = [p + r + NEW for p, r in zip(firsts, replies)]
        for k, p in enumerate(seconds):
            manager.add_request(input_ids=p, request_id=f"c{k}-1", max_new_tokens=10)
        done = finished(worker, 4)
        assert sum(calls) == 4 and len(calls) <= 2, calls
        for k, p in enumerate(seconds):
            assert done[f"c{k}-1"] == generate(p, 10), k
    finally:
        worker.close()


def test_the_index_finds_the_longest_shared_prefix() -> None:
    index = PrefixIndex()
    a = list(range(100))
    b = list(range(40)) + [999] * 60  # shares 40 tokens (two whole blocks and 8 more) with a
    index.keep(3, a, chain(a), 60)
    index.keep(5, b, chain(b), 60)
    prompt = list(range(70)) + [1, 2]
    assert index.match(prompt, chain(prompt)) == (3, 70)
    short = list(range(45))
    assert index.match(short, chain(short)) == (3, 45)  # both share 40 whole; a shares 45
    assert index.match([7] * 40, chain([7] * 40)) == (None, 0)
    assert index.match(list(range(BLOCK - 1)), chain(list(range(BLOCK - 1)))) == (None, 0), "less than a block"
    index.keep(1, list(a), chain(a), 60)  # the same tokens in a lower slot
    assert index.match(prompt, chain(prompt)) == (1, 70)
    index.swap(1, 6)
    assert 1 not in index and index.match(prompt, chain(prompt)) == (3, 70)
    index.drop(3)
    assert index.match(prompt, chain(prompt)) == (6, 70)
    fake = [5] * 64
    index.keep(2, fake, chain(prompt), 60)  # hashes that do not belong to the tokens: checked, not trusted
    index.drop(6)
    assert index.match(prompt, chain(prompt)) == (None, 0)


def test_the_index_gives_a_new_conversation_an_empty_slot_else_the_oldest() -> None:
    index = PrefixIndex()
    for slot in (0, 2, 1):
        index.keep(slot, [slot] * 20, chain([slot] * 20), 10)
    assert index.victim([0, 1, 2, 3]) == 3
    assert index.victim([0, 1, 2]) == 0
    assert index.victim([1, 2]) == 2
    index.keep(2, [9] * 20, chain([9] * 20), 10)
    assert index.continues(2, 10) and not index.continues(2, 9) and index.continues(1, 10)
    assert index.victim([1, 2]) == 1
    assert chain(list(range(40)))[:2] == chain(list(range(32))) and len(chain(list(range(40)))) == 2


def _prompt_tokens(http: str) -> dict[str, float]:
    text = httpx.get(f"{http}/metrics").text
    return {m[1]: float(m[2]) for m in re.finditer(r'^assistant_chat_prompt_tokens_total\{source="(\w+)"\} (\S+)$', text, re.M)}


def test_a_conversation_over_the_websocket_reuses_its_earlier_turns(tmp_path: Path, tiny_chat_model: Path) -> None:
    """Through the server: each turn's prompt holds the earlier turns (templated from the stored
    text), and after the first the model computes little more than the new message; /metrics says
    how much. With ``chat_prefix_reuse`` off, the replies are the same and every token is computed."""

    def conversation(reuse: bool) -> tuple[list[dict], dict[str, float]]:
        live = start_server(make_settings(tmp_path / str(reuse), tiny_chat_model, chat_engine="slots", chat_prefix_reuse=reuse))
        try:
            wait_ready(live)
            token = live.token("alice")

            async def go() -> list[dict]:
                async with ws_client(live, token) as c:
                    sid = await c.new_session()
                    return [(await c.turn(sid, text))[1] for text in ("My name is Ada.", "I like green tea.", "What is my name?")]

            return asyncio.run(go()), _prompt_tokens(live.http)
        finally:
            live.stop()

    dones, tokens = conversation(True)
    prompts = [d["usage"]["prompt_tokens"] for d in dones]
    assert tokens["computed"] + tokens["reused"] == sum(prompts)
    cached = [d["usage"]["cached_prompt_tokens"] for d in dones]  # each reply says what it reused
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]) and sum(cached) == tokens["reused"]
    # The second and third turns reuse the turn before them, all but where its reply's text met the
    # next message (a random model's tokens need not come back as the same ids).
    assert tokens["reused"] >= prompts[0] + prompts[1]
    assert tokens["computed"] <= prompts[0] + 2 * (prompts[2] - prompts[1]) + 2 * 24
    plain, plain_tokens = conversation(False)
    assert plain_tokens == {"computed": sum(prompts), "reused": 0}
    assert all(d["usage"]["cached_prompt_tokens"] == 0 for d in plain)
    assert [d["text"] for d in plain] == [d["text"] for d in dones], "reusing the slot changed the replies"


def test_a_conversation_longer_than_the_budget_still_reuses_most_turns(tmp_path: Path, tiny_chat_model: Path) -> None:
    """Through the server, with a 600-token prompt budget: once the conversation outgrows it, the
    oldest messages are dropped, but the prompt keeps its start while it fits (``build_prompt``'s
    ``keep_from``), so most later turns still reuse the turn before."""
    live = start_server(make_settings(tmp_path, tiny_chat_model, chat_engine="slots", chat_context_tokens=600))
    try:
        wait_ready(live)
        token = live.token("alice")

        async def go() -> list[tuple[int, float]]:
            out = []
            async with ws_client(live, token) as c:
                sid = await c.new_session()
                for turn in range(20):
                    before = _prompt_tokens(live.http)["reused"]
                    _, done = await c.turn(sid, f"Message {turn}: what should we plan next for the team?")
                    reused = _prompt_tokens(live.http)["reused"] - before
                    assert done["usage"]["cached_prompt_tokens"] == reused, turn
                    out.append((done["usage"]["prompt_tokens"], reused))
            return out

        turns = asyncio.run(go())
    finally:
        live.stop()
    full = next(i for i in range(1, len(turns)) if turns[i][0] < turns[i - 1][0])  # the first turn that dropped messages
    later = turns[full + 1 :]
    assert len(later) >= 6, turns
    reused = [r for _, r in later if r > 0]
    assert len(reused) >= 2 * len(later) // 3, turns
    assert all(prompt <= 600 for prompt, _ in turns)
