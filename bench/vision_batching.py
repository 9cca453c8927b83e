"""Images per second through the batching vision worker vs one image at a time.

Builds a random-weight BLIP model (tiny, or BLIP-base-shaped: speed does not depend on weight
values), saves it with a processor and loads it through ``VisionWorker.load`` like the server does,
then, in one run:
  * sequential: N requests, each awaited before the next is sent (a worker with max_batch=1);
  * batched: the same N requests sent at once (the worker's batching, max_batch=--batch-size).
Every request generates exactly --max-new-tokens tokens (end-of-text is made unreachable).

    .venv/bin/python bench/vision_batching.py --shape tiny --requests 32
    .venv/bin/python bench/vision_batching.py --shape blip-base --requests 32 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

from skills.vision_worker import VisionWorker, VisionWorkerOptions  # noqa: E402
from tests.tiny_vision_models import SPECIALS, WORDS, build_tiny_processor, blip_config  # noqa: E402

SHAPES = {
    "tiny": dict(text_hidden=32, text_layers=1, vision_hidden=32, vision_layers=1, heads=4, image_size=32, patch_size=8),
    # Salesforce/blip-*-base: ViT-B/16 at 384 px, 12-layer BERT-base text decoder, 30524 tokens.
    "blip-base": dict(
        text_hidden=768, text_layers=12, vision_hidden=768, vision_layers=12, heads=12, image_size=384, patch_size=16
    ),
}
BASE_VOCAB = 30524


def build_model(folder: Path, shape: str, task: str) -> Path:
    import torch
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    dims = SHAPES[shape]
    processor = build_tiny_processor(folder, image_size=dims["image_size"])
    vocab = len(processor.tokenizer) if shape == "tiny" else BASE_VOCAB
    if vocab > len(SPECIALS) + len(WORDS):  # pad the tokenizer so every generated id decodes
        processor.tokenizer.add_tokens([f"w{i}" for i in range(vocab - len(processor.tokenizer))])
        processor.save_pretrained(folder)
    config = blip_config(vocab_size=len(processor.tokenizer), **dims)
    torch.manual_seed(0)
    cls = BlipForConditionalGeneration if task == "caption" else BlipForQuestionAnswering
    model = cls(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(SPECIALS)] = -1e4  # never stop early
    model.save_pretrained(folder)
    return folder


def photos(n: int) -> list[bytes]:
    import skimage.data
    from PIL import Image

    names = ["astronaut", "chelsea", "coffee", "rocket"]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, names[i % len(names)])()).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


async def measure(worker: VisionWorker, one_at_a_time: VisionWorker, images: list[bytes], question: str | None) -> dict:
    # Warm up both paths (allocator, kernels) before timing.
    await asyncio.gather(*(worker.submit(im, question) for im in images[: worker.options.max_batch]))
    await one_at_a_time.submit(images[0], question)

    t = time.perf_counter()
    for im in images:
        await one_at_a_time.submit(im, question)
    sequential = time.perf_counter() - t

    seen = len(worker.batch_sizes)
    t = time.perf_counter()
    results = await asyncio.gather(*(worker.submit(im, question) for im in images))
    batched = time.perf_counter() - t
    assert all(r[1] == worker.options.max_new_tokens for r in results)
    n = len(images)
    return {
        "sequential_images_per_s": round(n / sequential, 3),
        "batched_images_per_s": round(n / batched, 3),
        "speedup": round(sequential / batched, 2),
        "batch_sizes": list(worker.batch_sizes)[seen:],
    }


async def main_async(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "model", args.shape, args.task)
        options = VisionWorkerOptions(
            model=str(folder),
            task=args.task,
            device=args.device,
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens,
            max_batch=args.batch_size,
            batch_wait_ms=args.batch_wait_ms,
        )
        worker = VisionWorker(options)
        await asyncio.to_thread(worker.load)
        single = VisionWorker(replace(options, max_batch=1))
        single.model, single.processor, single.device = worker.model, worker.processor, worker.device
        question = None if args.task == "caption" else "how many people are there?"
        result = await measure(worker, single, photos(args.requests), question)
        dtype = str(worker.model.dtype)
        await worker.aclose()
        await single.aclose()
    device = worker.device
    return {
        "benchmark": "vision_batching",
        "shape": args.shape,
        "task": args.task,
        "requests": args.requests,
        "max_batch": args.batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "max_new_tokens": args.max_new_tokens,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **result,
        "note": "random weights; on CPU only the speedup ratio is meaningful",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--task", choices=["caption", "vqa"], default="caption")
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests (N)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vision_batching.json")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    emit(result, args.out)


if __name__ == "__main__":
    main()
