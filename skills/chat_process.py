"""The chat worker in a process of its own: the out-of-process transport.

The model, transformers' continuous-batching loop and torch live in a child process (spawned, so
CUDA starts clean there); the web process keeps only the tokenizer. Requests and cancels go down a
pipe; new tokens come back in batches (one message for every request that advanced, at most every
``SEND_EVERY``, first tokens and ends at once), with the scheduler's occupancy, read by a thread
that hands them to the event loop. So the batching loop's Python work never holds the web
process's GIL, and a crash of the model process fails the running turns with a typed error
instead of taking the server down.

Same interface as ``skills.chat_worker.ChatWorker`` (the in-process transport), which the child
runs unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from skills.chat_worker import ChatWorker, ChatWorkerOptions, RecentPrompts
from skills.gc_pauses import freeze_loaded
from skills.model_process import spawn
from skills.slot_scheduler import StreamOutput

log = logging.getLogger(__name__)

STATS_EVERY = 0.1  # seconds between occupancy reports while nothing else is sent
# Seconds between messages of new tokens (first tokens and ends go at once). A 64-session decode
# step took 2.1 ms on the H200: a message a step woke 64 streams on the web process's loop 480
# times a second. Its frames go out every 20 ms (ASSISTANT_DELTA_FLUSH_INTERVAL) anyway.
SEND_EVERY = 0.01


class ChatProcessWorker:
    def __init__(self, options: ChatWorkerOptions) -> None:
        self.options = options
        self.tokenizer: Any = None
        self.eos_token_ids: list[int] = []
        self.max_positions: int | None = None
        self.recent_prompts = RecentPrompts(self)
        self.steps = 0
        self.engine = ""  # the child's batching engine, once loaded
        self.frozen_objects = 0  # objects the child froze once loaded (skills/gc_pauses.py)
        self._max_concurrent = 0
        self._kv_free = 1.0
        self._prompt_tokens = (0, 0)
        self._active: set[str] = set()
        self._handlers: dict[str, tuple[Callable, list[int]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: Any = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._alive = False

    # ------------------------------------------------------------------ loading (blocking; run in a thread)

    def load(self) -> None:
        from transformers import AutoTokenizer

        if self._conn is not None:  # a restart: the old process is gone
            self._conn.close()
        self._proc, parent, info = spawn(serve, (self.options,), name="chat-worker", what=repr(self.options.model))
        local = {"local_files_only": True} if self.options.local_files_only else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.options.model, **local)
        self.eos_token_ids, self.max_positions = info["eos_token_ids"], info["max_positions"]
        self.engine = info["engine"]
        self.frozen_objects = info["frozen_objects"]
        self._conn, self._alive = parent, True
        threading.Thread(target=self._read, name="chat-worker-reader", daemon=True).start()
        log.info("chat model %s loaded in worker process %d", self.options.model, self._proc.pid)

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._send(("close",))
        except (OSError, ValueError):
            pass
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._alive = False

    # ------------------------------------------------------------------ serving (call on the event loop)

    def is_running(self) -> bool:
        return self._alive and self._proc is not None and self._proc.is_alive()

    def submit(self, *, request_id: str, prompt_ids: list[int], max_new_tokens: int, on_output: Callable) -> None:
        if not self.is_running():
            raise RuntimeError("the chat worker process is not running")
        self._loop = asyncio.get_running_loop()
        self.recent_prompts.add(request_id, prompt_ids)
        self._handlers[request_id] = (on_output, [])
        self._active.add(request_id)
        self._send(("submit", request_id, prompt_ids, max_new_tokens))

    def cancel(self, request_id: str) -> None:
        self._handlers.pop(request_id, None)
        if self.is_running():
            self._send(("cancel", request_id))

    def kv_free_fraction(self) -> float:
        return self._kv_free

    def prompt_tokens(self) -> tuple[int, int]:
        """``ChatWorker.prompt_tokens`` of the model's process, as of its last message."""
        return self._prompt_tokens

    def active_request_ids(self) -> set[str]:
        return set(self._active)

    @property
    def max_concurrent_requests(self) -> int:
        return self._max_concurrent

    @max_concurrent_requests.setter
    def max_concurrent_requests(self, value: int) -> None:
        self._max_concurrent = value
        if self.is_running():
            self._send(("reset_max", value))

    # ------------------------------------------------------------------ plumbing

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read(self) -> None:
        """Reader thread: every message from the child goes to the event loop in one callback."""
        conn = self._conn
        try:
            while True:
                msg = conn.recv()
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._dispatch, msg)
                else:
                    self._apply_stats(msg[2])
        except (EOFError, OSError, RuntimeError):  # the child exited, or the server's loop closed
            pass
        if conn is not self._conn:  # a restarted process has its own reader
            return
        self._alive = False
        try:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._fail_all, "the chat worker process exited")
        except RuntimeError:
            pass

    def _apply_stats(self, stats: dict) -> None:
        self.steps = stats["steps"]
        self._max_concurrent = stats["max_concurrent"]
        self._kv_free = stats["kv_free"]
        self._prompt_tokens = stats["prompt_tokens"]
        self._active = set(stats["active"]) | {rid for rid in self._active if rid in self._handlers}

    def _dispatch(self, msg: tuple) -> None:
        _, items, stats = msg
        for request_id, new_tokens, finished, error, reused in items:
            entry = self._handlers.get(request_id)
            if entry is None:  # cancelled, or not ours any more
                continue
            handler, tokens = entry
            tokens.extend(new_tokens)
            if finished:
                del self._handlers[request_id]
            handler(StreamOutput(request_id, tokens, finished, error, reused))
        self._apply_stats(stats)

    def _fail_all(self, reason: str) -> None:
        handlers, self._handlers = self._handlers, {}
        for request_id, (handler, tokens) in handlers.items():
            handler(StreamOutput(request_id, tokens, True, reason))


# ---------------------------------------------------------------------- the child process


def serve(options: ChatWorkerOptions, conn: Any) -> None:
    """Child entry point: load the model, then run commands until ``close`` or the pipe closes."""
    worker = ChatWorker(options)
    try:
        worker.load()
    except Exception as exc:  # noqa: BLE001 - the parent turns this into the skill's unavailable state
        conn.send(("error", str(exc)))
        return
    frozen = freeze_loaded()  # the model, torch and transformers: out of the collector's full collections
    conn.send(("ready", {"eos_token_ids": worker.eos_token_ids, "max_positions": worker.max_positions, "engine": worker.engine,
                         "frozen_objects": frozen}))  # fmt: skip
    send_lock = threading.Lock()
    stop = threading.Event()
    cancelled: deque[str] = deque()  # the pump forgets these requests
    pump = threading.Thread(target=_pump, args=(worker, conn, send_lock, stop, cancelled), name="chat-outputs", daemon=True)
    pump.start()
    manager = worker._manager
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "submit":
                _, request_id, prompt_ids, max_new_tokens = msg
                manager.add_request(
                    input_ids=prompt_ids,
                    request_id=request_id,
                    max_new_tokens=max_new_tokens,
                    streaming=True,
                    eos_token_id=worker.eos_token_ids or None,
                )
            elif msg[0] == "cancel":
                manager.cancel_request(msg[1])
                cancelled.append(msg[1])
            elif msg[0] == "reset_max":
                worker.max_concurrent_requests = msg[1]
            elif msg[0] == "close":
                break
    except (EOFError, OSError):
        pass  # the web process went away
    finally:
        stop.set()
        pump.join(5)
        worker.close()


def _pump(
    worker: ChatWorker, conn: Any, send_lock: threading.Lock, stop: threading.Event, cancelled: deque[str],
    every: float = SEND_EVERY,
) -> None:
    """Collect outputs and send only the new tokens of each request, in one message: at once when a
    request has its first tokens or has finished, else at most every ``every`` seconds (each message
    wakes every stream it names on the web process's event loop)."""
    manager = worker._manager
    sent: dict[str, int] = {}
    latest: dict[str, Any] = {}  # request -> its newest output not sent yet
    last = 0.0
    while not stop.is_set():
        while cancelled:
            request_id = cancelled.popleft()
            sent.pop(request_id, None)
            latest.pop(request_id, None)
        wait = max(0.0, last + every - time.monotonic()) if latest else 0.02
        out = manager.get_result(timeout=wait)
        urgent = False
        while out is not None:
            latest[out.request_id] = out
            urgent = urgent or out.request_id not in sent or out.is_finished() or out.error is not None
            out = manager.get_result(timeout=0)  # None once nothing more is waiting
        now = time.monotonic()
        if not urgent and now - last < (every if latest else STATS_EVERY):
            continue
        items = []
        for request_id, out in latest.items():
            done = sent.get(request_id, 0)
            finished = out.is_finished() or out.error is not None
            since = getattr(out, "tokens_since", None)  # the slot engine's outputs; the library's have none
            new = since(done) if since is not None else list(out.generated_tokens[done:])
            items.append((request_id, new, finished, out.error, getattr(out, "reused", 0)))
            if finished:
                sent.pop(request_id, None)
            else:
                sent[request_id] = done + len(new)
        latest = {}
        stats = {
            "steps": worker.steps,
            "max_concurrent": worker.max_concurrent_requests,
            "kv_free": worker.kv_free_fraction(),
            "prompt_tokens": worker.prompt_tokens(),
            "active": sorted(worker.active_request_ids()),
        }
        try:
            with send_lock:
                conn.send(("out", items, stats))
        except (OSError, ValueError):
            return
        last = now
