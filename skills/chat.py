"""Chat generation: builds the multi-turn prompt from the history and streams the model's reply."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from skills.base import HistoryItem, SkillError, SkillRequest, SkillStatus, SkillUsage
from skills.chat_process import ChatProcessWorker
from skills.chat_worker import ChatWorker, ChatWorkerOptions
from skills.detokenize import IncrementalDetokenizer
from skills.lifecycle import ModelLoadError, ModelSkill

if TYPE_CHECKING:
    from skills.chat_first import ChatFirst

log = logging.getLogger(__name__)

# A history longer than this many characters per token of the budget is searched from its end
# without templating it whole first (English runs about four characters a token).
LIKELY_CHARS_PER_TOKEN = 8
# A conversation that outgrew the prompt budget drops its oldest messages until the prompt fits this
# much less than the budget, then keeps that start while it fits: its turns begin alike, so the model
# reuses what it computed of the turn before (skills/prefix_cache.py) instead of every turn's start
# moving one message on and the whole prompt being computed again.
DROP_HEADROOM = 0.25
KEPT_STARTS = 4096  # conversations whose prompt start is remembered (the most recent)
# How long a stream may see no output while the generation loop is dead before it fails.
_WATCHDOG_SECONDS = 1.0


_ENCODERS: weakref.WeakKeyDictionary[Any, Callable[[str], list[int]]] = weakref.WeakKeyDictionary()
_PROBE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Héllo,  wörld! 東京\tnaïve café <b>x</b> 12345 \n\n  ok"},
    {"role": "assistant", "content": " Sure - it's 3.14; “quotes” 🙂"},
    {"role": "user", "content": "And then?"},
]


def text_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """``text -> ids`` without special tokens, as ``tokenizer(text, add_special_tokens=False)``
    gives them. For a fast tokenizer, the tokenizers library's ``encode_batch`` directly when it
    gives the same ids as the wrapper on a probe conversation (templated, so with the template's
    special tokens): it skips the wrapper's argument handling (which may reset the tokenizer's
    truncation, a mutation that must not meet a decode on another thread) and lets the GIL go while
    it works. Such an encoder has ``off_loop = True``: ``ChatSkill`` builds prompts in a thread."""
    try:
        return _ENCODERS[tokenizer]
    except (KeyError, TypeError):
        pass

    def wrapped(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    encode = wrapped
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):

        def direct(text: str) -> list[int]:
            return backend.encode_batch([text], add_special_tokens=False)[0].ids

        direct.off_loop = True  # type: ignore[attr-defined] - no mutation of the tokenizer: safe beside decodes

        try:
            probe = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - no chat template: probe with the plain text
            probe = " ".join(m["content"] for m in _PROBE)
        if direct(probe) == wrapped(probe):
            encode = direct
    try:
        _ENCODERS[tokenizer] = encode
    except TypeError:  # not weak-referenceable: no cache
        pass
    return encode


def build_prompt(
    tokenizer: Any, *, system: str | None, history: list[HistoryItem], budget: int,
    keep_from: int | None = None, headroom: float = 0.0,
) -> tuple[list[int], int]:
    """Apply the chat template to (system, history); drop the oldest messages until the prompt fits
    ``budget`` tokens, never leaving an assistant message first. The last message (the new user
    turn) is always kept. Returns (ids, dropped).

    A conversation that outgrew the budget: ``keep_from`` is the position (``HistoryItem.position``)
    its previous prompt started at; while the prompt still fits from there it starts there again,
    so it begins as the previous one did and the model reuses what it computed of it
    (``skills/prefix_cache.py``). When it no longer fits, it drops until it fits
    ``budget * (1 - headroom)``, so the next turns fit from the same start too (or the budget, when
    only the last message would).

    This runs for every chat turn. A history that may fit is templated whole first, the usual case;
    one that does not is searched from its end (the last message alone, then twice as far back each
    time, then halving), so a 200-message conversation costs a few templates of about the budget's
    size instead of one of the whole history per message dropped (1.9 s of a stalled loop per turn
    before, ``bench/README.md``)."""
    head = [{"role": "system", "content": system}] if system else []
    msgs = [{"role": h.role, "content": h.text} for h in history]
    to_ids = text_encoder(tokenizer)
    # Where the kept part may start: after the oldest messages are dropped, a leading assistant
    # message goes too (the last message stays, whatever it is). The prompt shrinks as it starts later.
    starts = [0] + [i for i in range(1, len(msgs)) if msgs[i]["role"] != "assistant" or i == len(msgs) - 1]
    encoded: dict[int, list[int]] = {}  # index into starts -> its prompt

    def prompt(i: int) -> list[int]:
        # What apply_chat_template(tokenize=True) does: render, then encode without special tokens.
        if i not in encoded:
            text = tokenizer.apply_chat_template(head + msgs[starts[i] :], add_generation_prompt=True, tokenize=False)
            encoded[i] = to_ids(text)
        return encoded[i]

    def earliest(limit: int, bad: int) -> int | None:
        """The earliest index into starts after ``bad`` (known not to fit) whose prompt fits ``limit``."""
        good = len(starts) - 1
        if good <= bad or len(prompt(good)) > limit:  # the last message alone
            return None
        step = 1
        while good - step > bad:  # gallop back from the end
            if len(prompt(good - step)) > limit:
                bad = good - step
                break
            good, step = good - step, step * 2
        while good - bad > 1:  # the earliest start that fits lies in (bad, good]
            mid = (good + bad) // 2
            if len(prompt(mid)) <= limit:
                good = mid
            else:
                bad = mid
        return good

    bad = -1  # the latest index known not to fit (-1: none yet)
    if sum(len(m["content"]) for m in msgs) <= LIKELY_CHARS_PER_TOKEN * budget:
        if len(prompt(0)) <= budget:
            return prompt(0), 0
        bad = 0
    kept = None if keep_from is None else next((i for i, at in enumerate(starts) if history[at].position == keep_from), None)
    if kept is not None and kept > bad:
        if len(prompt(kept)) <= budget:
            return prompt(kept), starts[kept]
        bad = kept  # an earlier start is longer still
    good = earliest(budget - int(budget * headroom), bad) if headroom else None
    if good is None:
        good = earliest(budget, bad)
    if good is None:
        raise SkillError(
            "context_too_long",
            f"the message needs {len(prompt(len(starts) - 1))} prompt tokens but the budget is {budget}; "
            "send a shorter message or raise ASSISTANT_CHAT_CONTEXT_TOKENS",
        )
    return prompt(good), starts[good]


class ChatRun:
    """One streaming generation; iterate for text deltas.

    Outputs arrive on the event loop (``on_output``) faster than a busy loop wakes the run: they
    collect in a list, and a waiting run is woken once for all of them (one future per wait, no
    queue item or timeout per token). A watchdog timer, once a second, fails the run if no output
    came since its last look and the generation loop is dead."""

    def __init__(self, worker: ChatWorker | ChatProcessWorker, request_id: str, prompt_ids: list[int]) -> None:
        self._worker = worker
        self.request_id = request_id
        self.usage = SkillUsage(prompt_tokens=len(prompt_ids))
        self._pending: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self._cancelled = False
        self._dead = False
        self._outputs = 0  # outputs received, for the watchdog
        self._timer: asyncio.TimerHandle | None = None
        self._tokens: list[int] = []
        self._text = IncrementalDetokenizer(worker.tokenizer)

    def on_output(self, output: Any) -> None:
        self._pending.append(output)
        self._outputs += 1
        self._wake()

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._worker.cancel(self.request_id)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _watch(self, loop: asyncio.AbstractEventLoop, seen: int) -> None:
        if seen == self._outputs and not self._worker.is_running():
            self._timer, self._dead = None, True
            self._wake()
        else:
            self._timer = loop.call_later(_WATCHDOG_SECONDS, self._watch, loop, self._outputs)

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        self._watch(loop, -1)
        finished = False
        try:
            while not finished and not self._cancelled:
                if not self._pending and not self._dead:
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                if self._cancelled:
                    break
                if not self._pending:  # woken by the watchdog
                    raise SkillError("generation_failed", "the chat generation loop stopped")
                outs, self._pending = self._pending, []  # one frame for every output that arrived meanwhile
                for out in outs:
                    if out.error:
                        raise SkillError("generation_failed", f"generation failed: {out.error}")
                    finished = finished or out.is_finished()
                # Each output holds every token so far: the last one is enough.
                generated = outs[-1].generated_tokens
                self.usage.completion_tokens = len(generated)
                self.usage.cached_prompt_tokens = getattr(outs[-1], "reused", 0)  # the slot engine's outputs
                self._tokens = generated[:-1] if generated and generated[-1] in self._worker.eos_token_ids else generated
                delta = self._text.delta(self._tokens, final=finished)
                if delta:
                    yield delta
        finally:
            self._waiter = None
            if self._timer is not None:
                self._timer.cancel()


class ChatSkill(ModelSkill):
    name = "chat"
    setting = "ASSISTANT_CHAT_MODEL"

    def __init__(
        self,
        options: ChatWorkerOptions,
        *,
        system_prompt: str | None,
        context_tokens: int,
        enabled: bool = True,
        in_process: bool = True,
    ) -> None:
        super().__init__(enabled=enabled)
        self.worker = ChatWorker(options) if in_process else ChatProcessWorker(options)
        self.system_prompt = system_prompt
        self.context_tokens = context_tokens
        self._restart_lock = asyncio.Lock()
        self._due = 0  # turns routed here and not yet started (chat first)
        self._prompts = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-prompt")
        # Session -> the position its last prompt started at, when it dropped messages (build_prompt).
        self._starts: OrderedDict[str, int] = OrderedDict()

    def status(self) -> SkillStatus:
        st = super().status()
        if st.state == "ready" and not self.worker.is_running():
            if isinstance(self.worker, ChatProcessWorker):
                detail = "the chat model's process exited; the next turn restarts it"
            else:
                detail = "the chat generation loop stopped; restart the server"
            return SkillStatus(state="unavailable", detail=detail, extra=st.extra)
        return st

    async def _restart_if_exited(self) -> None:
        """A crashed model process failed its running turns; start a new one for the next turn."""
        if self.worker.is_running() or not isinstance(self.worker, ChatProcessWorker):
            return
        async with self._restart_lock:
            if not self.worker.is_running():
                log.warning("the chat model's process exited; starting a new one")
                try:
                    await asyncio.to_thread(self.worker.load)
                except ModelLoadError as exc:
                    raise SkillError("skill_unavailable", f"the chat model could not be restarted: {exc}") from exc

    def prompt_tokens(self) -> tuple[int, int]:
        """Prompt tokens computed, and read from a slot's earlier turn instead (the slot engine's
        prefix reuse, skills/prefix_cache.py)."""
        return self.worker.prompt_tokens()

    @property
    def chat_first(self) -> ChatFirst | None:
        """The flag that holds speech and vision steps for this model's prefill, where chat first is on."""
        return self.worker.options.chat_first

    def expect(self, turns: int = 1) -> None:
        """``turns`` were routed here: where chat goes first on a shared GPU, media holds from now
        until the last of them is handed to the scheduler (``skills/chat_first.py``), not only once
        the prompts reach it."""
        first = self.worker.options.chat_first
        if first is None:
            return
        if not first.expecting:  # lapsed: turns that never started (cancelled first) are forgotten
            self._due = 0
        self._due += turns
        first.expect()

    def _started(self) -> None:
        first = self.worker.options.chat_first
        if first is None:
            return
        self._due = max(0, self._due - 1)
        if self._due:
            first.expect()  # the rest of the burst is still to start
        else:
            first.expected_done()

    async def run(self, request: SkillRequest) -> ChatRun:
        try:
            return await self._run(request)
        finally:
            self._started()

    async def _run(self, request: SkillRequest) -> ChatRun:
        await self.wait_ready()
        await self._restart_if_exited()
        history = [*request.history, HistoryItem(role="user", text=request.text)]
        budget = self.context_tokens
        if self.worker.max_positions:
            budget = min(budget, self.worker.max_positions - 1)
        # Past the budget, a model that reuses the turn before keeps its start (less history some turns,
        # far less to compute); one that does not gets as much history as fits, every turn.
        reuse = self.worker.engine == "slots" and self.worker.options.prefix_reuse
        keep = {"keep_from": self._starts.get(request.session_id), "headroom": DROP_HEADROOM} if reuse else {}
        build = functools.partial(
            build_prompt, self.worker.tokenizer, system=self.system_prompt, history=history, budget=budget, **keep
        )  # fmt: skip
        if getattr(text_encoder(self.worker.tokenizer), "off_loop", False):
            # Off the event loop: the template holds the GIL briefly, the tokenizers library's encode
            # lets it go, so a burst's prompts are built beside the loop's other work (one thread, FIFO).
            prompt_ids, dropped = await asyncio.get_running_loop().run_in_executor(self._prompts, build)
        else:
            prompt_ids, dropped = build()
        self._starts.pop(request.session_id, None)
        if dropped:
            log.info("turn %s: dropped %d oldest messages to fit %d tokens", request.turn_id, dropped, budget)
            if history[dropped].position is not None:
                self._starts[request.session_id] = history[dropped].position
                if len(self._starts) > KEPT_STARTS:
                    self._starts.popitem(last=False)
        max_new = self.worker.options.max_new_tokens
        if self.worker.max_positions:
            max_new = max(1, min(max_new, self.worker.max_positions - len(prompt_ids)))
        run = ChatRun(self.worker, f"{request.turn_id}-{uuid.uuid4().hex[:8]}", prompt_ids)
        try:
            self.worker.submit(
                request_id=run.request_id, prompt_ids=prompt_ids, max_new_tokens=max_new, on_output=run.on_output
            )
        except RuntimeError as exc:
            raise SkillError("skill_unavailable", str(exc)) from exc
        return run
