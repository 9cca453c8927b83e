"""Where a chat decode step's time goes: the continuous-batching loop the server runs, profiled.

Loads the model through ``ChatWorker`` (the server's code path), queues N requests, lets prefill
finish, then records one window with ``torch.profiler`` (CPU and CUDA): steps/s, tokens/s, the
share of the window the GPU was busy, and the top CUDA kernels and CPU ops. For scale it also times
a plain eager forward of the same batch (N sequences, one new token each, a KV cache of the prompt
length) in a tight loop: what one decode step costs without the batching loop around it.

    python3 bench/profile_chat.py --sessions 1 64 --out /tmp/profile.json
    .venv/bin/python bench/profile_chat.py --model DIR --device cpu --sessions 4 --out /tmp/p.json
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


def profile_loop(
    model_dir: Path, sessions: int, cuda_graphs: bool | None, window_s: float, device: str = "cuda", engine: str = "library"
) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from skills.chat_worker import ChatWorker, ChatWorkerOptions

    worker = ChatWorker(
        ChatWorkerOptions(
            model=str(model_dir), device=device, max_new_tokens=4096, cuda_graphs=cuda_graphs, engine=engine,
            slots=max(sessions, 1), context_tokens=256,
        )
    )
    worker.load()
    manager = worker._manager
    prompt = worker.tokenizer.apply_chat_template([{"role": "user", "content": "word " * 100}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"]) if not isinstance(prompt, list) else prompt
    try:
        for i in range(sessions):
            manager.add_request(input_ids=prompt, request_id=f"r{i}", max_new_tokens=4096, streaming=False)
        time.sleep(3.0)  # prefill done, graphs captured: steady decoding
        forward = ("fused" if manager.engine.fused is not None else "model") if worker.engine == "slots" else None
        steps0 = worker.steps
        t0 = time.perf_counter()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            thread = manager._thread if worker.engine == "slots" else manager._generation_thread
            samples = sample_thread(thread.ident, window_s)
        wall = time.perf_counter() - t0
        steps = worker.steps - steps0
    finally:
        for i in range(sessions):
            manager.cancel_request(f"r{i}")
        time.sleep(0.5)
        worker.close()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    top_cuda = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    return {
        "sessions": sessions,
        "engine": worker.engine,
        "forward": forward,
        "cuda_graphs": cuda_graphs,
        "window_s": round(wall, 3),
        "steps": steps,
        "step_ms": round(wall * 1000 / steps, 2) if steps else None,
        "decode_tokens_per_s": round(steps * sessions / wall, 1),
        "gpu_busy_share": round(gpu_us / 1e6 / wall, 3),
        "top_cuda_kernels_ms": {e.key[:80]: round(e.self_device_time_total / 1000, 2) for e in top_cuda},
        # The generation thread's Python stack sampled every millisecond: share of samples in each
        # function (inclusive), which says where a step's CPU time goes.
        "generation_thread_python_profile": samples,
    }


def sample_thread(ident: int, seconds: float, every: float = 0.001) -> dict[str, float]:
    """Inclusive share of stack samples per function of thread ``ident`` over ``seconds``."""
    from collections import Counter

    counts: Counter[str] = Counter()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        frame = sys._current_frames().get(ident)
        seen = set()
        while frame is not None:
            code = frame.f_code
            key = f"{Path(code.co_filename).name}:{code.co_name}"
            if key not in seen:
                seen.add(key)
                counts[key] += 1
            frame = frame.f_back
        n += 1
        time.sleep(every)
    return {k: round(v / n, 3) for k, v in counts.most_common(25)} if n else {}


def plain_forward(model_dir: Path, sessions: int, context: int, steps: int = 30, device: str = "cuda") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.randint(10, 1000, (sessions, context), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        nxt = ids[:, -1:]
        for _ in range(3):
            model(nxt, past_key_values=cache, use_cache=True)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            model(nxt, past_key_values=cache, use_cache=True)
        sync()
        wall = (time.perf_counter() - t0) * 1000 / steps
        # GPU time alone: the same step replayed from a CUDA graph has no launch gaps between kernels.
        gpu = None
        if device == "cuda":
            static = DynamicCache(config=model.config)
            model(ids, past_key_values=static, use_cache=True)
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                model(nxt, past_key_values=static, use_cache=True)
            torch.cuda.current_stream().wait_stream(stream)
            try:
                with torch.cuda.graph(graph):
                    model(nxt, past_key_values=static, use_cache=True)
                graph.replay()
                sync()
                t0 = time.perf_counter()
                for _ in range(steps):
                    graph.replay()
                sync()
                gpu = round((time.perf_counter() - t0) * 1000 / steps, 2)
            except Exception as exc:  # noqa: BLE001 - a dynamic cache may refuse capture; report it
                gpu = f"not captured: {type(exc).__name__}"
    return {"sessions": sessions, "context": context, "eager_wall_ms_per_step": round(wall, 2), "graph_replay_ms_per_step": gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--sessions", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--window-s", type=float, default=1.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engines", nargs="*", default=["slots", "library"], choices=["slots", "library"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from bench.chat_model import build_chat_model

        model = build_chat_model(Path(tempfile.mkdtemp()) / "qwen", "qwen2.5-0.5b")
    result: dict = {"command": "python3 bench/profile_chat.py " + " ".join(sys.argv[1:]), "loop": [], "plain_forward": []}
    for n in args.sessions:
        result["plain_forward"].append(plain_forward(model, n, 120, device=args.device))
        print(result["plain_forward"][-1], flush=True)
        configs = [(e, g) for e in args.engines for g in ((True, False) if args.device == "cuda" else (False,))]
        for engine, graphs in configs:
            try:
                result["loop"].append(profile_loop(model, n, graphs, args.window_s, args.device, engine))
            except Exception as exc:  # noqa: BLE001 - keep the other measurements
                result["loop"].append(
                    {"sessions": n, "engine": engine, "cuda_graphs": graphs, "error": f"{type(exc).__name__}: {exc}"}
                )
            print(json.dumps(result["loop"][-1]), flush=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
