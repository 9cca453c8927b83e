"""A long prompt is computed in pieces (``chat_prefill_chunk`` tokens a step, ``SlotScheduler``):
the replies already streaming get a token between two pieces instead of freezing until the whole
prompt is read, a prompt sent meanwhile starts before it ends, and every reply is still exactly
what transformers' own ``generate`` gives for the whole prompt."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import make_settings, start_server, ws_client
from tests.test_prefix_reuse import _prompt_tokens, counts, load, reply
from tests.test_prefix_reuse import generate, model_dir  # noqa: F401 - the fixtures, one per module

CHUNK = 32
LONG = [(7 * k) % 200 + 10 for k in range(200)]  # 200 tokens: six pieces of 32, then 8
SHORT = list(range(30, 40))


def pieces(engine) -> list[tuple[str, int, int]]:  # noqa: ANN001
    """Record each prefill and extend call on ``engine``: (kind, first token computed, end)."""
    calls: list[tuple[str, int, int]] = []
    prefill, extend = engine.prefill, engine.extend

    def prefilled(rows: list[int], prompts: list[list[int]]) -> list[int]:
        calls.extend(("prefill", 0, len(p)) for p in prompts)
        return prefill(rows, prompts)

    def extended(rows: list[int], prompts: list[list[int]], starts: list[int], **kw: object) -> list[int]:
        calls.extend(("extend", s, len(p)) for p, s in zip(prompts, starts))
        return extend(rows, prompts, starts, **kw)

    engine.prefill, engine.extend = prefilled, extended
    return calls


@pytest.mark.parametrize(
    ("replay", "fused"), [(False, True), (True, True), (False, False)], ids=["eager", "replayed", "model-decoder"]
)
def test_a_long_prompt_is_computed_in_pieces_and_replies_as_generate_does(
    model_dir: Path, generate, replay: bool, fused: bool  # noqa: ANN001
) -> None:
    """A 200-token prompt goes in as a 32-token prefill and six extends; its reply is
    ``generate``'s. The next turn's long new message is extended in pieces from the turn before,
    which counts as reused once. ``replayed`` runs through graph capture and replay (the CPU stand-in):
    everything the pieces need was captured at load."""
    worker = load(model_dir, slots=4, fused_forward=fused, prefill_chunk=CHUNK)
    try:
        engine = worker._manager.engine
        engine.graphs.on = replay
        warmed = engine.warm(worker._manager.max_prefill_tokens, CHUNK)
        calls = pieces(engine)
        first = reply(worker, LONG, "a0", 20)
        assert first == generate(LONG, 20)
        assert calls == [("prefill", 0, 32)] + [("extend", s, s + 32) for s in range(32, 192, 32)] + [("extend", 192, 200)]
        assert counts(worker) == (200, 0), "a piece's start is not reused from an earlier turn"

        calls.clear()
        held = len(LONG) + len(first) - 1  # the slot holds the prompt and the reply but its last token
        second = LONG + first + LONG[:60]
        assert reply(worker, second, "a1", 20) == generate(second, 20)
        assert calls == [("extend", held, held + 32), ("extend", held + 32, len(second))]
        assert counts(worker) == (200 + len(second) - held, held)
        if replay:
            assert len(engine.graphs.keys()) == warmed, "a piece's step was first captured while serving"
    finally:
        worker.close()


@pytest.mark.parametrize("chunk", [CHUNK, 0], ids=["pieces", "whole"])
def test_a_reply_already_streaming_keeps_streaming_while_a_long_prompt_is_read(
    model_dir: Path, generate, chunk: int  # noqa: ANN001
) -> None:
    """A short prompt and a 200-token one sent together: in pieces, the short one's reply streams
    a token per piece before the long one's first token comes; whole, the long prompt is one step
    and the short reply waits for it. The replies are ``generate``'s either way."""
    worker = load(model_dir, slots=4, prefill_chunk=chunk)
    manager = worker._manager
    try:
        manager.add_request(input_ids=SHORT, request_id="short", max_new_tokens=40)
        manager.add_request(input_ids=LONG, request_id="long", max_new_tokens=10)
        short = 0  # the short reply's tokens so far
        streamed: int | None = None  # ... when the long one's first came
        done: dict[str, list[int]] = {}
        while len(done) < 2:
            out = manager.get_result(timeout=30)
            assert out is not None and out.error is None
            if out.request_id == "short":
                short = len(out.generated_tokens)
            elif streamed is None:
                streamed = short
            if out.is_finished():
                done[out.request_id] = list(out.generated_tokens)
        if chunk:
            assert streamed >= 5, f"the short reply had {streamed} tokens when the long prompt's first came"
        else:
            assert streamed <= 2, streamed
        assert done == {"short": generate(SHORT, 40), "long": generate(LONG, 10)}
    finally:
        worker.close()


@pytest.mark.parametrize("chunk", [CHUNK, 0], ids=["pieces", "whole"])
def test_a_prompt_sent_while_a_long_one_is_read_starts_before_it_ends(model_dir: Path, generate, chunk: int) -> None:  # noqa: ANN001
    """A short prompt sent just after a 200-token one: in pieces, it goes in beside one of the long
    prompt's pieces and its first token comes first; whole, it waits for the long prompt's step."""
    worker = load(model_dir, slots=4, prefill_chunk=chunk)
    manager = worker._manager
    try:
        manager.add_request(input_ids=LONG, request_id="long", max_new_tokens=4)
        manager.add_request(input_ids=SHORT, request_id="short", max_new_tokens=4)
        order: list[str] = []
        done: dict[str, list[int]] = {}
        while len(done) < 2:
            out = manager.get_result(timeout=30)
            assert out is not None and out.error is None
            if out.request_id not in order:
                order.append(out.request_id)
            if out.is_finished():
                done[out.request_id] = list(out.generated_tokens)
        assert order == (["short", "long"] if chunk else ["long", "short"])
        assert done == {"short": generate(SHORT, 4), "long": generate(LONG, 4)}
    finally:
        worker.close()


def cancel_during_the_second_piece(manager, request_id: str) -> None:  # noqa: ANN001
    """Cancel ``request_id`` while its prompt's second piece is computed (applied before the third)."""
    extend = manager.engine.extend

    def extended(rows: list[int], prompts: list[list[int]], starts: list[int], **kw: object) -> list[int]:
        if starts == [CHUNK]:
            manager.cancel_request(request_id)
            manager.engine.extend = extend
        return extend(rows, prompts, starts, **kw)

    manager.engine.extend = extended


def test_a_prompt_cancelled_between_pieces_frees_its_slot_and_a_retry_starts_from_them(
    model_dir: Path, generate  # noqa: ANN001
) -> None:
    """One slot. The long prompt is cancelled while its second piece is computed: it sends
    nothing, its slot is free for the same prompt sent again (a retry), and that computes only
    what the two pieces did not."""
    worker = load(model_dir, slots=1, prefill_chunk=CHUNK)
    manager = worker._manager
    try:
        cancel_during_the_second_piece(manager, "long")
        before = counts(worker)
        manager.add_request(input_ids=LONG, request_id="long", max_new_tokens=8)
        manager.add_request(input_ids=LONG, request_id="again", max_new_tokens=8)
        outputs = []
        while not (outputs and outputs[-1].is_finished()):
            out = manager.get_result(timeout=30)
            assert out is not None and out.error is None
            outputs.append(out)
        assert {o.request_id for o in outputs} == {"again"}, "the cancelled prompt sent something"
        assert list(outputs[-1].generated_tokens) == generate(LONG, 8)
        computed, reused = (a - b for a, b in zip(counts(worker), before))
        assert (computed, reused) == (len(LONG), 2 * CHUNK)  # the two pieces once, then the rest from them
    finally:
        worker.close()


def test_through_the_server_a_long_message_is_read_in_pieces(tmp_path: Path, tiny_chat_model: Path) -> None:
    """Through the websocket, with ``chat_prefill_chunk`` set: a long message's prompt goes to the
    model in pieces of that size, the reply is what a server computing it whole gives, and
    /metrics counts its tokens as computed, none as reused."""

    def ask(chunk: int) -> tuple[dict, list[tuple[str, int, int]], dict[str, float]]:
        live = start_server(make_settings(tmp_path / str(chunk), tiny_chat_model, chat_engine="slots", chat_prefill_chunk=chunk))
        try:
            calls = pieces(live.app.state.skills["chat"].worker._manager.engine)
            token = live.token("alice")

            async def go() -> dict:
                async with ws_client(live, token) as c:
                    sid = await c.new_session()
                    text = " ".join(["Please summarise the notes from our planning meeting about the release."] * 12)
                    return (await c.turn(sid, text))[1]

            return asyncio.run(go()), calls, _prompt_tokens(live.http)
        finally:
            live.stop()

    done, calls, tokens = ask(64)
    prompt = done["usage"]["prompt_tokens"]
    assert prompt > 3 * 64
    assert [end - start for _, start, end in calls[:-1]] == [64] * (len(calls) - 1) and calls[-1][2] == prompt
    assert tokens == {"computed": prompt, "reused": 0} and done["usage"]["cached_prompt_tokens"] == 0
    whole, calls, _ = ask(0)
    assert calls == [("prefill", 0, prompt)]
    assert whole["text"] == done["text"]
