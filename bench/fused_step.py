"""One slot-engine decode step, through the fused forward and through the model's own decoder.

Counts the operations one step dispatches (each is a kernel launch on a GPU, so a step replayed
from a CUDA graph costs about their number times a few microseconds) and times steps of both
forwards, alternating, at each batch size. On the CPU the default shape keeps Qwen2.5-0.5B's 24
layers and heads but narrows the widths, so that the time is the per-operation overhead that
bounds a graph-replayed GPU step rather than the CPU's arithmetic; on a GPU use the real shape.

    .venv/bin/python bench/fused_step.py --out bench/results/fused_step_cpu.json
    python3 bench/fused_step.py --device cuda --shape qwen2.5-0.5b --out /tmp/fused_step_gpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit, stamp  # noqa: E402
from bench.chat_model import SHAPES  # noqa: E402

NARROW = {**SHAPES["qwen2.5-0.5b"], "vocab_size": 4096, "hidden_size": 14 * 16, "intermediate_size": 1216}
VIEWS = {
    "view", "reshape", "_unsafe_view", "transpose", "unsqueeze", "expand", "slice", "select", "t", "permute",
    "squeeze", "alias", "detach", "as_strided", "_reshape_alias", "split", "unbind", "chunk", "split_with_sizes",
}  # fmt: skip


def count_ops(fn) -> dict[str, int]:  # noqa: ANN001
    """The operations ``fn`` dispatches that are not views (views launch nothing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: collections.Counter[str] = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            name = func.overloadpacket.__name__
            if name not in VIEWS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    with Count() as counter:
        fn()
    return dict(counter.ops.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="narrow", choices=["narrow", *SHAPES])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from skills.slot_engine import Sampling, SlotEngine

    dims = NARROW if args.shape == "narrow" else SHAPES[args.shape]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):
        model = Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=True)).eval().to(dtype)
    slots = max(args.batches)
    graphs = args.device.startswith("cuda")
    engines = {
        kind: SlotEngine(model, slots=slots, max_len=2 * args.context, sampling=Sampling(), cuda_graphs=graphs, fused=kind == "fused")
        for kind in ("model", "fused")
    }
    probe = list(range(10, 42))
    for kind, engine in engines.items():
        assert engine.check(probe) is None, kind
        assert (engine.fused is not None) == (kind == "fused"), kind

    def sync() -> None:
        if graphs:
            torch.cuda.synchronize()

    result: dict = {
        **stamp(),
        "device": torch.cuda.get_device_name() if graphs else "cpu",
        "shape": args.shape, "dims": dims, "dtype": str(dtype), "cuda_graphs": graphs, "batches": [],
    }  # fmt: skip
    for batch in args.batches:
        row: dict = {"batch": batch, "ops_per_step": {}, "step_ms": {}}
        for kind, engine in engines.items():
            engine.reset()
            engine.patch({s: (5, args.context // 2) for s in range(batch)})
            with torch.inference_mode():
                ops = count_ops(lambda: engine._decode_fn(batch, args.context))  # noqa: B023
            row["ops_per_step"][kind] = {"total": sum(ops.values()), "top": dict(list(ops.items())[:12])}
            engine.launch(batch, args.context).tokens()  # captured (GPU) and warm
        samples: dict[str, list[float]] = {kind: [] for kind in engines}
        for _ in range(args.rounds):  # alternating, so both see the same machine
            for kind, engine in engines.items():
                engine.patch({s: (5, args.context // 2) for s in range(batch)})
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step = engine.launch(batch, args.context)
                step.tokens()
                sync()
                samples[kind].append((time.perf_counter() - t0) / args.steps * 1000)
        row["step_ms"] = {kind: round(statistics.median(v), 3) for kind, v in samples.items()}
        row["step_ms_all"] = {kind: [round(x, 3) for x in v] for kind, v in samples.items()}
        row["ops_ratio"] = round(row["ops_per_step"]["model"]["total"] / row["ops_per_step"]["fused"]["total"], 2)
        row["speedup"] = round(row["step_ms"]["model"] / row["step_ms"]["fused"], 2)
        print(json.dumps({k: row[k] for k in ("batch", "step_ms", "ops_ratio", "speedup")}), flush=True)
        result["batches"].append(row)
    emit(result, args.out)


if __name__ == "__main__":
    main()
