"""Start the real server for a benchmark: our skills, the naive baseline, or the model-free flood.

    python -m bench.serve --mode ours --chat-model DIR --port 8100 --workdir /tmp/b

The bearer token for the load generator is written to ``<workdir>/token``; the server is ready
when ``/healthz`` says so.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["ours", "naive", "flood"], required=True)
    ap.add_argument("--chat-model", default="")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--flush-interval", type=float, default=0.02, help="seconds between coalesced delta frames")
    ap.add_argument("--cuda-graphs", choices=["library", "on", "off"], default="on", help="library: let transformers decide")
    ap.add_argument("--compile-level", type=int, default=0)
    ap.add_argument("--worker", choices=["auto", "thread", "process"], default="auto", help="where the chat model runs")
    ap.add_argument("--media-worker", choices=["auto", "thread", "process"], default="auto", help="where speech and vision run")
    ap.add_argument("--engine", choices=["auto", "slots", "library"], default="auto", help="the chat batching engine")
    ap.add_argument("--slots", type=int, default=None, help="slot engine: requests decoded at once")
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--flood-words", type=int, default=200)
    ap.add_argument("--flood-pace", type=float, default=0.0, help="flood: seconds between words")
    ap.add_argument("--frames-per-s", type=float, default=None, help="ASSISTANT_DELTA_FRAMES_PER_S (0: no cap)")
    ap.add_argument("--history-chars", type=int, default=None, help="ASSISTANT_HISTORY_CHARS (0: the whole history)")
    ap.add_argument("--chat-first", choices=["auto", "on", "off"], default="auto", help="speech and vision hold for chat prefill")
    ap.add_argument("--speech-model", default="")
    ap.add_argument("--caption-model", default="")
    ap.add_argument("--vqa-model", default="")
    args = ap.parse_args()

    import uvicorn

    from assistant.server import create_app, uvicorn_options
    from assistant.settings import Settings
    from bench.baseline import FloodSkill, NaiveChatSkill
    from skills.chat_worker import ChatWorkerOptions
    from state import db as state_db
    from state import store

    raise_fd_limit()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.INFO)  # its cache sizing and CUDA-graph choices
    args.workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        host="127.0.0.1",
        port=args.port,
        database_url=f"sqlite:///{args.workdir / 'assistant.db'}",
        data_dir=args.workdir / "data",
        model_profile="standard",
        hub_offline=True,
        chat_model=args.chat_model,
        chat_device=args.device,
        chat_max_new_tokens=args.max_new_tokens,
        chat_context_tokens=1024,
        chat_kv_blocks=args.kv_blocks,
        chat_kv_page_size=64 if args.device == "cpu" else 256,
        chat_max_batch_tokens=args.max_batch_tokens,
        chat_cuda_graphs={"library": None, "on": True, "off": False}[args.cuda_graphs],
        chat_compile_level=args.compile_level,
        chat_worker=args.worker,
        media_worker=args.media_worker,
        chat_first=args.chat_first,
        chat_engine=args.engine,
        chat_slots=args.slots,
        delta_flush_interval=args.flush_interval,
        **({} if args.frames_per_s is None else {"delta_frames_per_s": args.frames_per_s}),
        history_chars=args.history_chars,
        speech_model=args.speech_model,
        speech_device=args.device,
        speech_language="en",
        caption_model=args.caption_model,
        vqa_model=args.vqa_model,
        vision_device=args.device,
        max_queued_turns=64,
        max_outbound_queue=1 << 16,
    )
    skills = None
    if args.mode == "naive":
        options = ChatWorkerOptions(model=args.chat_model, device=args.device, max_new_tokens=args.max_new_tokens)
        skills = {"chat": NaiveChatSkill(options, system_prompt=settings.chat_system_prompt, context_tokens=1024)}
    elif args.mode == "flood":  # model-free chat; speech and vision as configured (none unless named)
        from skills.registry import build_skills

        media = build_skills(settings) if args.speech_model or args.caption_model or args.vqa_model else {}
        skills = {**{k: v for k, v in media.items() if k != "chat"}, "chat": FloodSkill(args.flood_words, args.flood_pace)}
    app = create_app(settings, skills=skills)
    state_db.upgrade(app.state.engine)
    with app.state.sessions.begin() as db:
        token = store.create_token(db, user=store.get_or_create_user(db, name="bench"), label="bench")
    (args.workdir / "token").write_text(token)
    uvicorn.run(app, log_level="warning", **uvicorn_options(settings))


if __name__ == "__main__":
    main()
