"""The slot engine (skills/slot_engine.py, skills/slot_scheduler.py) generates exactly what the
model's own ``generate`` does, while requests of different lengths join, wait for a slot, finish
and are cancelled around each other; and a model it does not fit falls back to the library."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from skills.chat_worker import ChatWorker, ChatWorkerOptions
from skills.lifecycle import ModelLoadError
from tests.tiny_models import build_tiny_chat_model

PROMPTS = {
    "short": [5, 6, 7, 8, 9],
    "long": list(range(10, 70)),
    "mid": [3, 17, 90, 4] * 5,
    "late": [200, 100, 50, 25, 12, 6],
    "queued": [44] * 33,
}
MAX_NEW = {"short": 40, "long": 25, "mid": 60, "late": 30, "queued": 20}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("wide-chat"), layers=3, hidden=64, weight_std=0.35)


@pytest.fixture(scope="module")
def reference(wide_model: Path) -> dict[str, list[int]]:
    """Greedy continuations from transformers' own ``generate``, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide_model).eval()
    out = {}
    for name, prompt in PROMPTS.items():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW[name], do_sample=False, pad_token_id=0)
        out[name] = ids[0, len(prompt) :].tolist()
    assert len(set(map(tuple, out.values()))) == len(out)
    assert all(len(set(toks)) > 5 for toks in out.values()), "the test model only repeats itself"
    return out


def load(model: Path, **options: object) -> ChatWorker:
    worker = ChatWorker(ChatWorkerOptions(model=str(model), device="cpu", max_new_tokens=64, context_tokens=256, **options))
    worker.load()
    return worker


def collect(worker: ChatWorker, results: dict, until, timeout: float = 60) -> None:  # noqa: ANN001
    """Read outputs (the queue the process transport reads) until ``until(results)``."""
    deadline = time.monotonic() + timeout
    while not until(results):
        assert time.monotonic() < deadline, f"timed out; have {results}"
        out = worker._manager.get_result(timeout=0.05)
        if out is not None:
            assert out.error is None
            results[out.request_id] = (list(out.generated_tokens), out.is_finished())


@pytest.mark.parametrize(
    ("replay", "fused"), [(False, True), (True, True), (False, False)], ids=["eager", "replayed", "model-decoder"]
)
def test_slots_generate_what_generate_does_while_requests_come_and_go(
    wide_model: Path, reference: dict, replay: bool, fused: bool
) -> None:
    """``replayed``: every step goes through the graph capture and replay path (its CPU stand-in):
    warm-up runs, a capture that must not advance the decode state, one replay per step.
    ``model-decoder``: the model's own decoder instead of the fused forward (the default)."""
    worker = load(wide_model, engine="slots", slots=3, fused_forward=fused)
    try:
        assert worker.engine == "slots"
        manager = worker._manager
        engine = manager.engine
        assert (engine.fused is not None) == fused
        engine.graphs.on = replay
        warmed = engine.warm(manager.max_prefill_tokens)  # what a GPU load does: every step shape captured
        assert warmed == (len(engine.graphs.keys()) if replay else 0)

        def add(name: str, **kw: object) -> None:
            manager.add_request(input_ids=PROMPTS[name], request_id=name, max_new_tokens=MAX_NEW[name], streaming=True, **kw)

        results: dict[str, tuple[list[int], bool]] = {}
        for name in ("short", "long", "mid"):
            add(name)
        collect(worker, results, lambda r: len(r.get("short", ([],))[0]) >= 5)
        add("late")  # all three slots are busy: waits for one to free
        add("queued")
        assert {"late", "queued"} <= worker.active_request_ids()
        collect(worker, results, lambda r: len(r.get("mid", ([],))[0]) >= 10)
        manager.cancel_request("mid")
        collect(worker, results, lambda r: all(r.get(n, (0, False))[1] for n in ("short", "long", "late", "queued")))
        time.sleep(0.2)
        while (out := manager.get_result(timeout=0.05)) is not None:  # whatever the step before the cancel made
            assert out.request_id == "mid" and not out.is_finished()
        assert not worker.active_request_ids() and worker.kv_free_fraction() == 1.0
    finally:
        worker.close()
    for name in ("short", "long", "late", "queued"):
        tokens, finished = results[name]
        assert finished and tokens == reference[name], name
    mid, finished = results["mid"]
    assert not finished and 10 <= len(mid) < MAX_NEW["mid"] and mid == reference["mid"][: len(mid)]
    assert worker.max_concurrent_requests == 3, "requests did not share the decode steps"
    assert engine.moves > 0, "no request was moved down when the steps could narrow"
    if replay:
        kinds = {key[0] for key in engine.graphs.keys()}
        assert kinds == {"decode", "prefill", "extend"}, "the steps were not replayed"
        assert len(engine.graphs.keys()) == warmed, "a step shape was first captured while serving, stalling the replies"


def test_a_burst_of_one_token_prompts_is_admitted_whole(wide_model: Path) -> None:
    """Twelve turns at once, prompts shorter than the burst: every one is prefilled, none is lost."""
    import torch
    from transformers import AutoModelForCausalLM

    prompts = {f"b{i}": [20 + i] * (1 + i % 2) for i in range(12)}
    model = AutoModelForCausalLM.from_pretrained(wide_model).eval()
    want = {
        rid: model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p) :].tolist()
        for rid, p in prompts.items()
    }
    worker = load(wide_model, engine="slots")
    engine, groups, added = worker._manager.engine, [], threading.Event()
    prefill = engine.prefill

    def counted(rows: list[int], group: list[list[int]]) -> list[int]:
        added.wait(10)  # the first group holds the engine until every request is queued
        groups.append(len(group))
        return prefill(rows, group)

    engine.prefill = counted
    try:
        for rid, prompt in prompts.items():
            worker._manager.add_request(input_ids=prompt, request_id=rid, max_new_tokens=8)
        added.set()
        results: dict = {}
        collect(worker, results, lambda r: len(r) == len(prompts) and all(done for _, done in r.values()))
    finally:
        worker.close()
    assert {rid: tokens for rid, (tokens, _) in results.items()} == want
    # What queued behind the first group is prefilled in one step (16 rows, some of them padding).
    assert sum(groups) == len(prompts) and len(groups) <= 2 and max(groups) >= len(prompts) - 1, groups


@pytest.mark.parametrize("replay", [False, True], ids=["eager", "replayed"])
def test_a_reply_left_alone_in_a_high_slot_moves_down_and_the_steps_narrow(
    wide_model: Path, reference: dict, replay: bool
) -> None:
    """Six requests fill slots 0-5 of 8; the five in the low slots finish first, one by one. Each
    time the running ones fit a narrower bucket, those above it move down (keys, values and decode
    state, behind the step in flight): the steps shrink from 8 rows to 4 to 1, and every reply is
    still exactly what ``generate`` gives."""
    worker = load(wide_model, engine="slots", slots=8)
    manager = worker._manager
    engine = manager.engine
    engine.graphs.on = replay
    engine.widths.clear()  # the load check's steps
    order = ["short", "late", "queued", "long", "mid", "long"]  # the last, "alone", takes slot 5
    try:
        for i, name in enumerate(order):
            max_new = 6 + i if i < 5 else MAX_NEW[name]
            rid = name if i < 5 else "alone"
            manager.add_request(input_ids=PROMPTS[name], request_id=rid, max_new_tokens=max_new)
        results: dict = {}
        collect(worker, results, lambda r: r.get("alone", (0, False))[1] and len(r) == 6)
    finally:
        worker.close()
    widths = list(engine.widths)
    assert results["alone"][0] == reference["long"]
    for i, name in enumerate(order[:5]):
        assert results[name][0] == reference[name][: 6 + i], name
    assert engine.moves == 3, "slots 4 and 5 down to 0 and 1 at four running, then 1 down to 0"
    assert widths[0] == 8 and 4 in widths and widths[-1] == 1, widths
    assert widths.count(1) >= MAX_NEW["long"] - 12, "the steps did not narrow once it was alone"


def test_a_prompt_that_does_not_fit_its_slot_fails_alone(wide_model: Path, reference: dict) -> None:
    worker = load(wide_model, engine="slots")  # a slot holds context_tokens + max_new_tokens = 320
    manager = worker._manager
    try:
        manager.add_request(input_ids=[7] * 400, request_id="huge", max_new_tokens=4)
        manager.add_request(input_ids=[], request_id="empty", max_new_tokens=4)
        manager.add_request(input_ids=PROMPTS["short"], request_id="ok", max_new_tokens=MAX_NEW["short"])
        errors, results = {}, {}
        deadline = time.monotonic() + 60
        while not results.get("ok", (0, False))[1] and time.monotonic() < deadline:
            out = manager.get_result(timeout=0.05)
            if out is None:
                continue
            if out.error:
                errors[out.request_id] = out.error
            else:
                results[out.request_id] = (out.generated_tokens, out.is_finished())
    finally:
        worker.close()
    assert set(errors) == {"huge", "empty"} and "not 400" in errors["huge"] and "not 0" in errors["empty"]
    assert results["ok"] == (reference["short"], True)


def test_a_reply_stops_at_its_end_of_sequence_token(wide_model: Path, reference: dict) -> None:
    want = reference["long"]
    stop = next(i for i, t in enumerate(want) if i >= 4 and t not in want[:i])
    worker = load(wide_model, engine="slots")
    try:
        worker._manager.add_request(input_ids=PROMPTS["long"], request_id="r", max_new_tokens=40, eos_token_id=[want[stop]])
        results: dict = {}
        collect(worker, results, lambda r: r.get("r", (0, False))[1])
    finally:
        worker.close()
    assert results["r"][0] == want[: stop + 1]


def test_each_output_keeps_the_tokens_it_had_when_made(wide_model: Path, reference: dict) -> None:
    """Outputs read the request's own growing token list (no copy per step): one held until the
    reply ends still gives exactly the tokens of its step, and the new ones since any point."""
    worker = load(wide_model, engine="slots")
    outs = []
    try:
        worker._manager.add_request(input_ids=PROMPTS["short"], request_id="r", max_new_tokens=MAX_NEW["short"])
        deadline = time.monotonic() + 60
        while not (outs and outs[-1].is_finished()):
            assert time.monotonic() < deadline
            if (out := worker._manager.get_result(timeout=0.05)) is not None:
                outs.append(out)
    finally:
        worker.close()
    want = reference["short"]
    assert [o.generated_tokens for o in outs] == [want[: i + 1] for i in range(len(want))]
    assert outs[9].tokens_since(7) == want[7:10] and outs[-1].tokens_since(len(want)) == []


def test_sampling_settings_reach_the_engine(wide_model: Path, reference: dict) -> None:
    results: dict = {}
    for name, temperature, top_p in (("nucleus", 1.0, 1e-6), ("hot", 100.0, 1.0)):
        worker = load(wide_model, engine="slots", temperature=temperature, top_p=top_p)
        try:
            worker._manager.add_request(input_ids=PROMPTS["mid"], request_id=name, max_new_tokens=MAX_NEW["mid"])
            collect(worker, results, lambda r, n=name: r.get(n, (0, False))[1])
        finally:
            worker.close()
    # A nucleus of one token is greedy; a very hot temperature is close to uniform over the vocabulary.
    assert results["nucleus"][0] == reference["mid"]
    hot = results["hot"][0]
    assert len(hot) == MAX_NEW["mid"] and hot != reference["mid"] and len(set(hot)) > 20


def test_the_load_check_catches_a_cache_that_reads_the_wrong_slot(wide_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from skills.slot_engine import Sampling, SlotEngine

    model = AutoModelForCausalLM.from_pretrained(wide_model).eval()
    engine = SlotEngine(model, slots=2, max_len=128, sampling=Sampling(), cuda_graphs=False)
    probe = list(range(10, 40))
    assert engine.check(probe) is None
    cache, keep = engine.cache, engine.cache.update

    def wrong_row(key, value, layer, *args, **kwargs):  # noqa: ANN001, ANN202 - decode reads slot 1's keys for slot 0
        k, v = keep(key, value, layer, *args, **kwargs)
        if cache._read is None:  # prefill attends to the prompt itself
            return k, v
        return cache.keys[layer][1:2, :, : cache._read], cache.values[layer][1:2, :, : cache._read]

    engine.cache.update = wrong_row
    why = engine.check(probe)
    assert why is not None and "logits differ from the model's own forward" in why


def test_a_fused_forward_that_disagrees_gives_way_to_the_model_decoder(wide_model: Path, reference: dict) -> None:
    """A fused forward whose rotary table is wrong fails the load check; the engine then runs the
    model's own decoder and still generates what ``generate`` does."""
    from transformers import AutoModelForCausalLM

    from skills.slot_engine import Sampling, SlotEngine

    model = AutoModelForCausalLM.from_pretrained(wide_model).eval()
    engine = SlotEngine(model, slots=2, max_len=128, sampling=Sampling(), cuda_graphs=False)
    assert engine.fused is not None
    engine.fused.cos = engine.fused.cos.flip(0)  # positions read backwards
    assert engine.check(list(range(10, 40))) is None
    assert engine.fused is None
    prompt = PROMPTS["short"]
    got = [engine.prefill([0], [prompt])[0]]
    for i in range(MAX_NEW["short"] - 1):
        got.append(engine.decode({0: (got[-1], len(prompt) + i)})[0])
    assert got == reference["short"]


@pytest.mark.parametrize("bias", [False, True], ids=["llama", "llama-with-biases"])
def test_the_fused_forward_matches_a_llama_model_with_and_without_biases(tmp_path: Path, bias: bool) -> None:
    """Llama's layout (SmolLM2's), and its optional biases on every projection (o_proj and down_proj
    included, which the fused forward adds after folding the residual in)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from skills.fused_decoder import fusable
    from skills.slot_engine import Sampling, SlotEngine

    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.35)
    assert fusable(model) is None
    engine = SlotEngine(model, slots=2, max_len=64, sampling=Sampling(), cuda_graphs=False)
    probe = [(7 * i) % 300 for i in range(30)]
    assert engine.check(probe) is None and engine.fused is not None
    ids = probe[:12]
    with torch.inference_mode():  # greedy through the model's own full forward, one token at a time
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    want = ids[12:]
    assert len(set(want)) > 8, "the test model only repeats itself"
    got = [engine.prefill([1], [probe[:12]])[0]]  # slot 1: rows above 0 are read right too
    for i in range(19):
        got.append(engine.decode({1: (got[-1], 12 + i)})[1])
    assert got == want


def test_a_model_the_slots_do_not_fit_falls_back_to_the_library(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder = build_tiny_chat_model(tmp_path / "sliding", layers=2, hidden=64, weight_std=0.35)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.use_sliding_window, model.config.sliding_window, model.config.max_window_layers = True, 4, 0
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    model.save_pretrained(folder)
    with torch.no_grad():  # the window changes what the model predicts on a longer prompt
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        assert reloaded.config.sliding_window == 4

    worker = load(folder)
    try:
        assert worker.engine == "library"
    finally:
        worker.close()
    with pytest.raises(ModelLoadError, match="sliding-window attention .*ASSISTANT_CHAT_ENGINE=library"):
        load(folder, engine="slots")


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(wide_model: Path, reference: dict) -> None:
    worker = load(wide_model, engine="slots")
    engine = worker._manager.engine
    prefill, launch = engine.prefill, engine.launch
    failures = {"decode": 0}

    def bad_prefill(rows: list[int], prompts: list[list[int]]) -> list[int]:
        if any(99 in p for p in prompts):
            raise RuntimeError("CUDA out of memory (simulated)")
        return prefill(rows, prompts)

    def bad_launch(batch: int, context: int):  # noqa: ANN202
        if failures["decode"]:
            failures["decode"] -= 1
            raise RuntimeError("device lost (simulated)")
        return launch(batch, context)

    engine.prefill, engine.launch = bad_prefill, bad_launch
    manager = worker._manager
    results: dict = {}
    try:
        manager.add_request(input_ids=PROMPTS["long"], request_id="ok", max_new_tokens=MAX_NEW["long"])
        collect(worker, results, lambda r: len(r.get("ok", ([],))[0]) >= 3)
        manager.add_request(input_ids=[99, 98, 97], request_id="bad", max_new_tokens=10)
        out = None
        while out is None or out.request_id != "bad":
            out = manager.get_result(timeout=5)
            assert out is not None
            if out.request_id == "ok":
                results["ok"] = (list(out.generated_tokens), out.is_finished())
        assert out.is_finished() and "out of memory" in out.error and out.generated_tokens == []
        collect(worker, results, lambda r: r["ok"][1])  # the running request was not disturbed
        assert results["ok"][0] == reference["long"]

        failures["decode"] = 1
        manager.add_request(input_ids=PROMPTS["mid"], request_id="lost", max_new_tokens=MAX_NEW["mid"])
        while (out := manager.get_result(timeout=5)) is not None and not out.is_finished():
            pass
        assert out is not None and out.request_id == "lost" and "device lost" in out.error
        manager.add_request(input_ids=PROMPTS["short"], request_id="after", max_new_tokens=MAX_NEW["short"])
        collect(worker, results, lambda r: r.get("after", (0, False))[1])
        assert results["after"][0] == reference["short"] and worker.is_running()
    finally:
        worker.close()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu.sh runs this)")
def test_steps_replayed_from_cuda_graphs_generate_what_eager_steps_do(wide_model: Path, reference: dict) -> None:
    """Prompts of more than 16 tokens to compute go in pieces of 16 (``prefill_chunk``), and every
    step they take was captured at load."""
    outputs = {}
    for graphs in (False, True):
        worker = ChatWorker(
            ChatWorkerOptions(
                model=str(wide_model), device="cuda", dtype="float32", max_new_tokens=64, context_tokens=256,
                engine="slots", slots=4, cuda_graphs=graphs, prefill_chunk=16,
            )
        )
        worker.load()
        try:
            assert worker._manager.engine.graphs.on is graphs
            warmed = len(worker._manager.engine.graphs.keys())
            for name in ("short", "long", "mid", "late"):
                worker._manager.add_request(input_ids=PROMPTS[name], request_id=name, max_new_tokens=MAX_NEW[name])
            results: dict = {}
            collect(worker, results, lambda r: len(r) == 4 and all(done for _, done in r.values()))
            for name in ("short", "long", "mid", "late"):  # each conversation's next turn: extended in its slot
                follow = PROMPTS[name] + results[name][0] + [5, 6, 7]
                worker._manager.add_request(input_ids=follow, request_id=f"{name}-2", max_new_tokens=20)
            collect(worker, results, lambda r: len(r) == 8 and all(done for _, done in r.values()))
            assert worker.prompt_tokens()[1] >= sum(len(PROMPTS[n]) for n in ("short", "long", "mid", "late"))
            if graphs:
                keys = worker._manager.engine.graphs.keys()
                assert {"decode", "prefill", "extend"} <= {key[0] for key in keys}, keys
                assert len(keys) == warmed, "a step was first captured while serving"
        finally:
            worker.close()
        outputs[graphs] = {name: tokens for name, (tokens, _) in results.items()}
    assert outputs[True] == outputs[False]
    agree = sum(outputs[True][n] == reference[n] for n in PROMPTS if n in outputs[True])
    assert agree >= 3, "the GPU's float32 kernels disagree with the CPU reference on more than a near-tie"
