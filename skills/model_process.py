"""A model in a process of its own: the out-of-process transport of the speech and vision workers.

The worker keeps its batching where it was (the speech worker's thread, the vision worker's batcher
on the event loop) and hands each batch to ``ModelProcess.call``, which runs the model's method in a
spawned child (CUDA starts clean there) and waits on a pipe for the result. Waiting on a pipe holds
no GIL, so the model's Python (a launch-bound ``generate`` or decode loop on a GPU) never competes
with the web process's event loop. Exceptions come back as they were raised where they can be
pickled (``SkillError`` can), else as a ``RuntimeError`` naming them.

A child that exits (a crash, the OOM killer) fails the batch it was running with
``ModelProcessExited``; the next call starts a new one, so the skill recovers without a restart.
The chat model has its own streaming transport (``skills.chat_process``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

from skills.gc_pauses import freeze_loaded
from skills.lifecycle import ModelLoadError

log = logging.getLogger(__name__)

START_TIMEOUT = 900.0  # seconds a model may take to load in the child


class ModelProcessExited(RuntimeError):
    """The child process exited while (or before) running a call."""


class ModelProcess:
    """``factory(options)`` (a module-level function: it is pickled to the child) builds and loads
    the model object there; ``call(method, *args)`` runs ``getattr(model, method)(*args)`` in the
    child and returns its result. Calls are serialised (one batch at a time, as the workers send
    them)."""

    def __init__(self, name: str, factory: Callable[[Any], Any], options: Any) -> None:
        self.name, self.factory, self.options = name, factory, options
        self.info: dict[str, Any] = {}  # what the loaded model reported (``host_info()``)
        self.starts = 0
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and self._conn is not None

    def start(self) -> dict[str, Any]:
        """Spawn the child and wait until its model is loaded (blocking); raises ``ModelLoadError``."""
        with self._lock:
            return self._start()

    def _start(self) -> dict[str, Any]:
        self._stop()
        self._proc, self._conn, self.info = spawn(serve, (self.factory, self.options), name=self.name, what="its model")
        self.starts += 1
        log.info("%s model loaded in process %d", self.name, self._proc.pid)
        return self.info

    def call(self, method: str, *args: Any) -> Any:
        """Run ``method`` in the child (blocking). A child that has exited is started again first."""
        with self._lock:
            if not self.is_running():
                if self.starts:
                    log.warning("the %s process exited; starting a new one", self.name)
                self._start()
            try:
                self._conn.send((method, args))
                kind, value = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                proc = self._proc
                self._stop()  # reaps it, so its exit code is known
                code = proc.exitcode if proc is not None else None
                raise ModelProcessExited(f"the {self.name} process exited (exit code {code})") from None
        if kind == "raise":
            raise value
        return value

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            try:
                conn.send(("close", ()))
            except (OSError, ValueError):
                pass
            conn.close()
        if proc is not None:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def spawn(target: Callable[..., None], args: tuple, *, name: str, what: str) -> tuple[Any, Any, Any]:
    """Start ``target(*args, conn)`` in a spawned child and wait for its first message: ``("ready",
    info)`` returns (process, pipe, info); anything else, a timeout or an exit raises
    ``ModelLoadError`` (``what`` names what it was loading). Both child transports start this way."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child), name=name, daemon=True)
    proc.start()
    child.close()
    if not parent.poll(START_TIMEOUT):
        proc.kill()
        raise ModelLoadError(f"the {name} process did not load {what} in {START_TIMEOUT:.0f} s")
    try:
        kind, value = parent.recv()
    except EOFError:
        proc.join(10)
        raise ModelLoadError(f"the {name} process exited while loading (exit code {proc.exitcode})") from None
    if kind != "ready":
        proc.join(10)
        raise value if isinstance(value, ModelLoadError) else ModelLoadError(str(value))
    return proc, parent, value


# ---------------------------------------------------------------------- the child process


def serve(factory: Callable[[Any], Any], options: Any, conn: Any) -> None:
    """Child entry point: build and load the model, then answer calls until ``close`` or EOF."""
    _share_the_cores()
    try:
        model = factory(options)
    except Exception as exc:  # noqa: BLE001 - the parent raises it as the skill's load error
        conn.send(("error", _portable(exc)))
        return
    info = model.host_info() if hasattr(model, "host_info") else {}
    info["frozen_objects"] = freeze_loaded()  # the model and its libraries: out of the collector's full collections
    conn.send(("ready", info))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break  # the web process went away
        if method == "close":
            break
        try:
            result = ("ok", getattr(model, method)(*args))
        except Exception as exc:  # noqa: BLE001 - the caller's batch fails with it; the child serves on
            log.exception("%s failed in the model process", method)
            result = ("raise", _portable(exc))
            free_cuda_memory()
        try:
            conn.send(result)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # pickling fails before a byte is sent
            conn.send(("raise", RuntimeError(f"the result of {method} could not be sent back: {exc}")))
    close = getattr(model, "close", None)
    if callable(close):
        close()


def _share_the_cores() -> None:
    """Give torch's CPU work in this process a quarter of the cores (at least one). Every process
    would otherwise start an OpenMP pool as wide as the machine, and the web process, the chat
    model's process and two of these spinning full pools on the same cores made speech and vision
    requests 3-9x slower on the 2-core CPU (mixed load, ``bench/README.md``)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 4))


def free_cuda_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back after a failed batch (an out-of-memory one
    leaves them reserved). Nothing to do where torch was never imported; never raises."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - a broken CUDA context: the batch's own error is what matters
        log.debug("could not empty the CUDA cache", exc_info=True)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")
