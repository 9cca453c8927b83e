"""The dialogue manager: owns the turn lifecycle and the per-session event stream.

received/queued → routed → running → completed | cancelled | failed | interrupted

Every server event of a session is written to its event log (with the next ``seq``) in the same
transaction as the state change it reports, then fanned out to the connections watching the
session. The user message is stored before any model runs; the assistant message is updated as
text streams, so a crash loses nothing that was acknowledged, and the next start marks what was
running as ``interrupted``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel
from sqlalchemy.orm import Session, sessionmaker

from assistant import protocol as p
from assistant.stream_writer import StreamWriter
from assistant.metrics import Metrics
from assistant.image_context import asked, image_bytes, image_context, mentions_attachments, turn_attachments
from assistant.router import Decision, SessionState, TurnRequest, UnknownSkill, route
from assistant.settings import Settings
from skills.base import HistoryItem, Skill, SkillError, SkillRequest, SkillRun
from state import store
from state.attachments import AttachmentRef, BlobStore, attachment_refs, blob_refs, release_blobs, session_attachments
from state.context import ContextRow
from state.context import context as read_context
from state.context import contexts as read_contexts
from state.models import ChatSession, new_id, utcnow

log = logging.getLogger(__name__)

HISTORY_REPLY_STATUSES = ("completed", "cancelled", "interrupted")
# The text a turn reads of its session's history, per token of the chat prompt's budget: beyond what
# any real text packs into that many tokens (English runs about four characters a token).
HISTORY_CHARS_PER_TOKEN = 16
TTFT_STAGES = ("admit", "start", "model", "send")  # see Metrics.ttft_stages
PURGE_ROWS = 500  # a deleted session's rows removed per transaction (events: ~1 ms, messages: ~6 ms)


class Subscriber(Protocol):
    def deliver(self, frame: str) -> None:
        """Queue one serialised server event; never blocks."""

    def replay(self, frames: list[str]) -> None:
        """Queue a session's logged events (``resume``), however many; never blocks."""


class DialogueError(Exception):
    def __init__(self, code: p.ErrorCode, message: str, *, session_id: str | None = None, turn_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.session_id, self.turn_id = code, message, session_id, turn_id


@dataclass
class _Turn:
    turn_id: str
    session_id: str
    reply_id: str
    position: int
    text: str
    attachment_ids: tuple[str, ...]
    override: str | None
    cancelled: bool = False
    run: SkillRun | None = None
    partial: str = ""  # text streamed so far
    ttft_ms: float | None = None
    image_ids: tuple[str, ...] = ()  # the attachments that are images
    routing: tuple[Decision, list[HistoryItem]] | None = None  # set when routed as it was admitted
    started: float = 0.0  # time.monotonic() when routing began


@dataclass
class _Admission:
    """A turn waiting to be admitted, and what came of it: ``turn`` once stored, else ``error``."""

    user_id: str
    event: p.TurnCreate
    sub: Subscriber | None
    input_kind: str
    on_store: Callable[[Session, str], BaseModel | None] | None
    done: asyncio.Future | None = None  # submit_turn's
    received: float = field(default_factory=time.monotonic)
    busy: bool = False  # the session runs or queues a turn already
    waiting: int = 0  # turns waiting ahead of it (not counting the running one)
    turn: _Turn | None = None
    frames: list[str] = field(default_factory=list)  # its logged events, sent after the commit
    error: Exception | None = None


@dataclass
class _SessionRunner:
    queue: deque[_Turn] = field(default_factory=deque)
    current: _Turn | None = None
    task: asyncio.Task | None = None


def session_info(sess: ChatSession) -> p.SessionInfo:
    return p.SessionInfo(
        id=sess.id, title=sess.title, created_at=store.as_iso(sess.created_at), updated_at=store.as_iso(sess.updated_at)
    )


class DialogueManager:
    def __init__(
        self,
        *,
        settings: Settings,
        sessions: sessionmaker[Session],
        skills: dict[str, Skill],
        metrics: Metrics,
        blobs: BlobStore | None = None,
    ) -> None:
        self.settings = settings
        self.blobs = blobs if blobs is not None else BlobStore(settings.data_dir / "blobs")
        self._sessions = sessions
        self.skills = skills
        self.metrics = metrics
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._runners: dict[str, _SessionRunner] = {}
        # How much of a session a turn reads: at most what a chat prompt can hold (state.context).
        chars = settings.history_chars
        self._history_chars = (HISTORY_CHARS_PER_TOKEN * settings.chat_context_tokens if chars is None else chars) or None
        self._purges: set[asyncio.Task] = set()  # deleted sessions whose rows are being removed
        self._streaming = 0  # replies streaming now (their frames share delta_frames_per_s)
        self._admissions: list[_Admission] = []  # submitted this turn of the event loop
        self._writer = StreamWriter(sessions, self._fan_out)
        metrics.queued.set_function(lambda: sum(len(r.queue) for r in self._runners.values()))
        metrics.running.set_function(lambda: sum(1 for r in self._runners.values() if r.current is not None))

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _db(self) -> Iterator[Session]:
        with self._sessions.begin() as db:
            yield db

    def _publish(self, session_id: str, event: BaseModel, change: Callable[[Session], None] | None = None) -> None:
        """Apply ``change``, log ``event`` with the next seq, commit, then fan it out."""
        with self._db() as db:
            if change is not None:
                change(db)
            frame = self._log(db, session_id, event)
        self._fan_out(session_id, frame)

    @classmethod
    def _log(cls, db: Session, session_id: str, event: BaseModel) -> str:
        """Log ``event`` with the next seq in ``db``'s transaction; returns the frame to send after commit."""
        return cls._log_many(db, [(session_id, event)])[0]

    @staticmethod
    def _log_many(db: Session, events: list[tuple[str, BaseModel]]) -> list[str]:
        """Log (session id, event) pairs in order, each with its session's next seq (one seq update
        per session, one insert); returns their frames."""
        logged = store.append_events(db, events=[(sid, e.type, p.dump_at_seq(e)) for sid, e in events])  # type: ignore[attr-defined]
        return [frame for _, frame in logged]

    def _fan_out(self, session_id: str, frame: str) -> None:
        for sub in list(self._subscribers.get(session_id, ())):
            try:
                sub.deliver(frame)
            except Exception:  # noqa: BLE001 - a broken subscriber is dropped; the session and the others go on
                log.exception("a subscriber of session %s failed to take an event; detaching it", session_id)
                self.detach(sub)

    def _owned(self, db: Session, user_id: str, session_id: str) -> ChatSession:
        sess = store.get_session(db, session_id=session_id, user_id=user_id)
        if sess is None:
            raise self._not_found(session_id)
        return sess

    @staticmethod
    def _not_found(session_id: str) -> DialogueError:
        return DialogueError(p.ErrorCode.session_not_found, f"no session {session_id!r} for this user", session_id=session_id)

    def routable_skills(self) -> dict[str, Skill]:
        """Skills a turn can be routed to (input stages such as speech feed the router instead)."""
        return {n: s for n, s in self.skills.items() if not getattr(s, "input_stage", False)}

    def subscribe(self, session_id: str, sub: Subscriber) -> None:
        self._subscribers.setdefault(session_id, set()).add(sub)

    def detach(self, sub: Subscriber) -> None:
        for sid in list(self._subscribers):
            subs = self._subscribers[sid]
            subs.discard(sub)
            if not subs:
                del self._subscribers[sid]

    # ------------------------------------------------------------------ sessions

    def create_session(self, *, user_id: str, title: str | None, sub: Subscriber | None, event_id: str | None) -> str:
        with self._db() as db:
            sess = store.create_session(db, user_id=user_id, title=title)
            frame = self._log(db, sess.id, p.SessionCreated(session_id=sess.id, session=session_info(sess), event_id=event_id))
        if sub is not None:
            self.subscribe(sess.id, sub)
        self._fan_out(sess.id, frame)
        return sess.id

    def resume(
        self, *, user_id: str, session_id: str, last_seq: int, sub: Subscriber, event_id: str | None, batch: bool = False
    ) -> None:
        """Replay the log after ``last_seq`` (every event but the deltas of replies that have ended,
        whose ``response.done`` has the whole text) and the deltas of the reply streaming now, in
        ``session.replay`` frames when ``batch``, and watch the session. Runs without awaiting, so
        no live event can slip between the replay and the subscription."""
        with self._db() as db:
            sess = self._owned(db, user_id, session_id)
            logged = store.events_after(db, session_id=session_id, after_seq=last_seq)
            current = sess.last_seq
        missed = [ev.payload for ev in logged]
        streaming = self._writer.streaming_after(session_id, last_seq)
        if streaming:  # merged by seq: another turn's events (a queued one cancelled) may fall between
            missed = [frame for _, frame in heapq.merge(((ev.seq, ev.payload) for ev in logged), streaming)]
        if missed:
            sub.replay(p.replay_frames(session_id, missed) if batch else missed)
        self.subscribe(session_id, sub)
        sub.deliver(
            p.dump_event(
                p.SessionResumed(session_id=session_id, last_seq=current, replayed=len(missed), event_id=event_id)
            )
        )

    async def delete_session(self, *, user_id: str, session_id: str) -> bool:
        """Hide the session at once (every lookup then says not found), stop its turns, release its
        files, and remove its rows in the background, ``PURGE_ROWS`` per transaction: a long
        session's rows held the event loop up to 200 ms in one (``bench/delete_session.py``)."""
        with self._db() as db:
            sess = store.get_session(db, session_id=session_id, user_id=user_id)
            if sess is None:
                return False
            blobs = {sha for row in session_attachments(db, session_id=session_id) for sha in blob_refs(row)}
            store.mark_deleted(db, session=sess)
        runner = self._runners.pop(session_id, None)
        if runner is not None:
            for turn in [*runner.queue, *([runner.current] if runner.current else [])]:
                turn.cancelled = True
                if turn.run is not None:
                    turn.run.cancel()
            if runner.task is not None:
                runner.task.cancel()
                await asyncio.gather(runner.task, return_exceptions=True)
        self._subscribers.pop(session_id, None)
        self._purge(session_id)
        if blobs:  # its images and audio go with it, unless another session refers to the same bytes
            await asyncio.to_thread(release_blobs, self._sessions, self.blobs, blobs)
        return True

    def _purge(self, session_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._purge_rows(session_id))
        self._purges.add(task)
        task.add_done_callback(self._purges.discard)

    async def _purge_rows(self, session_id: str) -> None:
        try:
            while True:
                with self._db() as db:
                    if not store.purge_session(db, session_id=session_id, limit=PURGE_ROWS):
                        return
                await asyncio.sleep(0)  # the other sessions' frames and turns between two transactions
        except Exception:  # noqa: BLE001 - the session stays hidden; the next start purges it again
            log.exception("purging deleted session %s", session_id)

    # ------------------------------------------------------------------ turns

    def create_turn(
        self,
        *,
        user_id: str,
        event: p.TurnCreate,
        sub: Subscriber | None,
        input_kind: str = "text",
        on_store: Callable[[Session, str], BaseModel | None] | None = None,
    ) -> str:
        """Store and queue a turn now, in a transaction of its own; returns its id. ``input_kind`` is
        "speech" for a transcript; ``on_store(db, turn_id)`` runs in the turn's transaction (e.g. to
        store its audio) and may return an event that is logged and sent just before
        ``turn.created`` (the ``transcript.final`` of a spoken turn)."""
        admission = _Admission(user_id, event, sub, input_kind, on_store)
        self._admit([admission])
        if admission.error is not None:
            raise admission.error
        return admission.turn.turn_id  # type: ignore[union-attr]

    def submit_turn(self, *, user_id: str, event: p.TurnCreate, sub: Subscriber | None) -> asyncio.Future[str]:
        """Store and queue a turn together with every other turn submitted in the same turn of the
        event loop (group commit: one transaction, and one read of each kind, for all of them). The
        future gives the turn's id, or raises its ``DialogueError``; a turn fails alone."""
        admission = _Admission(user_id, event, sub, "text", None, asyncio.get_running_loop().create_future())
        self._admissions.append(admission)
        if len(self._admissions) == 1:
            asyncio.get_running_loop().call_soon(self._admit_submitted)
        return admission.done  # type: ignore[return-value]

    def _admit_submitted(self) -> None:
        batch, self._admissions = self._admissions, []
        try:
            self._admit(batch)
        except Exception as exc:  # noqa: BLE001 - a bug after the commit: fail what is still waiting
            log.exception("admitting %d turns failed", len(batch))
            for it in batch:
                if it.error is None and it.turn is None:
                    it.error = exc
        for it in batch:
            if it.done is None or it.done.done():
                continue
            if it.error is not None:
                it.done.set_exception(it.error)
            else:
                it.done.set_result(it.turn.turn_id)  # type: ignore[union-attr]

    def _admit(self, batch: list[_Admission]) -> None:
        """Store, log and queue ``batch``'s turns in one transaction; each one's ``turn`` or ``error``
        is set. Should the transaction fail, each turn is tried again alone, so that one bad turn
        fails only itself."""
        todo = [it for it in batch if not self._refused(it)]
        if not todo:
            return
        try:
            with self._db() as db:
                self._store_turns(db, todo)
        except Exception as exc:  # rolled back: nothing of it is stored
            for it in todo:
                it.turn, it.error = None, None
                it.frames.clear()
            if len(todo) == 1:
                todo[0].error = exc
                return
            for it in todo:
                self._admit([it])
            return
        for it in todo:
            if it.turn is None:
                continue
            try:
                self._queue_turn(it)
            except Exception:  # noqa: BLE001 - a bug: this stored turn fails; the batch's others are queued
                log.exception("queueing turn %s failed", it.turn.turn_id)
                self._finish(it.turn, p.TurnStatus.failed, text="", skill=None, usage=p.Usage())

    def _refused(self, it: _Admission) -> bool:
        """Checks that need no database; sets ``it.error``."""
        event, settings = it.event, self.settings
        if len(event.text) > settings.max_text_chars:
            it.error = DialogueError(
                p.ErrorCode.text_too_long,
                f"text is {len(event.text)} characters; the limit is {settings.max_text_chars}",
                session_id=event.session_id,
            )
        elif not event.text.strip() and not event.attachment_ids:
            it.error = DialogueError(p.ErrorCode.empty_turn, "a turn needs text or an attachment", session_id=event.session_id)
        elif event.skill is not None and event.skill not in self.routable_skills():
            it.error = DialogueError(
                p.ErrorCode.skill_unknown,
                f"unknown skill {event.skill!r}; available: {', '.join(sorted(self.routable_skills()))}",
                session_id=event.session_id,
            )
        return it.error is not None

    def _store_turns(self, db: Session, batch: list[_Admission]) -> None:
        """The transaction of ``_admit``: a turn to an idle session is routed at once (its context read
        for all of them in one query), one to a busy session is queued behind what it runs."""
        heads = store.session_heads(db, session_ids={it.event.session_id for it in batch})
        # The attachments of every session a turn names some of, in one read (see image_context).
        refs = attachment_refs(db, session_ids={it.event.session_id for it in batch if it.event.attachment_ids})
        lines: dict[str, list[int]] = {}  # session -> [turns queued, 1 if one runs], this batch's included
        admitted: list[tuple[_Admission, _Turn]] = []
        for it in batch:
            event = it.event
            head = heads.get(event.session_id)
            if head is None or head.user_id != it.user_id:
                it.error = self._not_found(event.session_id)
                continue
            unknown, image_ids = (
                turn_attachments(refs[head.id], user_id=it.user_id, ids=event.attachment_ids)
                if event.attachment_ids
                else ([], [])
            )
            if unknown:
                it.error = DialogueError(
                    p.ErrorCode.attachment_not_found,
                    f"no attachment {unknown[0]!r} in this session; upload it to the session first",
                    session_id=head.id,
                )
                continue
            line = lines.get(head.id)
            if line is None:
                runner = self._runners.get(head.id)
                line = lines[head.id] = [len(runner.queue), int(runner.current is not None)] if runner else [0, 0]
            # Turns ahead of this one: the running one (or the queue's head, about to run) and those waiting.
            queued, running = line
            it.busy = bool(queued or running)
            it.waiting = queued - (0 if running else 1) if it.busy else 0
            if it.waiting >= self.settings.max_queued_turns:
                it.error = DialogueError(
                    p.ErrorCode.turn_queue_full,
                    f"{it.waiting} turns are already waiting in this session; wait or cancel one",
                    session_id=head.id,
                )
                continue
            line[0] += 1
            turn = _Turn(new_id(), head.id, "", -1, event.text, tuple(event.attachment_ids), event.skill)
            turn.image_ids = tuple(image_ids)
            admitted.append((it, turn))
        if not admitted:
            return
        idle = {turn.session_id for it, turn in admitted if not it.busy}
        contexts = read_contexts(db, session_ids=idle, chars=self._history_chars, asked=asked) if idle else {}
        more = {sid for sid in idle if sid not in refs and mentions_attachments(contexts.get(sid, ()))}
        if more:  # earlier turns of these sessions named attachments: their images are labelled
            refs.update(attachment_refs(db, session_ids=more))
        new_turns = []
        for it, turn in admitted:
            position, reply = None, None
            if not it.busy:
                # The session is idle, so the turn runs next: route it now, in the same transaction.
                msgs = contexts.get(turn.session_id, [])
                position = msgs[-1].position + 1 if msgs else 0
                turn.started = it.received
                try:
                    turn.routing = self._decide(db, turn, msgs, position, refs.get(turn.session_id, {}))  # read above if any
                    reply = self._routed_fields(turn.routing[0], cancelled=False)
                except UnknownSkill:  # a /command naming no skill: _run_turn fails the turn
                    pass
            status = p.TurnStatus.queued if it.busy else p.TurnStatus.received
            new_turns.append(
                store.NewTurn(
                    turn.session_id, turn.turn_id, turn.text, list(turn.attachment_ids), status.value,
                    it.event.skill, it.input_kind, position, reply,
                )  # fmt: skip
            )
        for name, n in Counter(turn.routing[0].skill for _, turn in admitted if turn.routing is not None).items():
            expect = getattr(self.skills.get(name), "expect", None)  # e.g. chat first on a shared GPU
            if expect is not None:
                expect(n)
        stored = store.add_turns(db, turns=new_turns, titles={t.session_id: heads[t.session_id].title for _, t in admitted})
        events: list[tuple[_Admission, BaseModel]] = []
        for (it, turn), (reply_id, position) in zip(admitted, stored):
            turn.reply_id, turn.position = reply_id, position
            preface = it.on_store(db, turn.turn_id) if it.on_store is not None else None
            if preface is not None:
                events.append((it, preface))
            # Logged in the turn's own transaction: stored and acknowledged together.
            created = p.TurnCreated(
                session_id=turn.session_id,
                turn_id=turn.turn_id,
                text=turn.text,
                attachment_ids=list(turn.attachment_ids),
                input=it.input_kind,
                event_id=it.event.event_id,
            )
            events.append((it, created))
            if turn.routing is not None:
                events.append((it, self._routed_event(turn, turn.routing[0])))
            elif it.busy:
                events.append((it, p.TurnQueued(session_id=turn.session_id, turn_id=turn.turn_id, position=it.waiting + 1)))
        frames = self._log_many(db, [(it.event.session_id, event) for it, event in events])
        for (it, _), frame in zip(events, frames):
            it.frames.append(frame)
        for it, turn in admitted:
            it.turn = turn

    def _queue_turn(self, it: _Admission) -> None:
        """After the commit: send the turn's events, and queue it in its session's runner."""
        turn = it.turn
        assert turn is not None
        if it.sub is not None:
            self.subscribe(turn.session_id, it.sub)
        for frame in it.frames:
            self._fan_out(turn.session_id, frame)
        runner = self._runners.setdefault(turn.session_id, _SessionRunner())
        runner.queue.append(turn)
        if runner.task is None or runner.task.done():
            runner.task = asyncio.get_running_loop().create_task(self._drain(turn.session_id, runner))

    def cancel(self, *, user_id: str, event: p.ResponseCancel) -> None:
        with self._db() as db:
            self._owned(db, user_id, event.session_id)
        runner = self._runners.get(event.session_id)
        if runner is not None and runner.current is not None and runner.current.turn_id == event.turn_id:
            turn = runner.current
            turn.cancelled = True
            if turn.run is not None:
                turn.run.cancel()
            return
        queued = next((t for t in (runner.queue if runner else ()) if t.turn_id == event.turn_id), None)
        if queued is None:
            raise DialogueError(
                p.ErrorCode.turn_not_found,
                f"turn {event.turn_id!r} is not running or queued in this session",
                session_id=event.session_id,
                turn_id=event.turn_id,
            )
        runner.queue.remove(queued)  # type: ignore[union-attr]
        self._finish(queued, p.TurnStatus.cancelled, text="", skill=None, usage=p.Usage())

    async def _drain(self, session_id: str, runner: _SessionRunner) -> None:
        try:
            while runner.queue:
                turn = runner.queue.popleft()
                runner.current = turn
                try:
                    await self._run_turn(turn)
                finally:
                    runner.current = None
        finally:
            if self._runners.get(session_id) is runner and not runner.queue:
                del self._runners[session_id]

    def _decide(
        self, db: Session, turn: _Turn, msgs: Sequence[ContextRow], position: int, refs: Mapping[str, AttachmentRef] | None = None
    ) -> tuple[Decision, list[HistoryItem]]:
        """Route ``turn`` (its user message at ``position``) given the session's messages before it
        (``state.context`` rows) and its attachments (``attachment_refs``; read here when None and a
        message names one); raises ``UnknownSkill``. Returns the decision and the history the skill gets."""
        if refs is None:
            refs = attachment_refs(db, session_ids=[turn.session_id])[turn.session_id] if mentions_attachments(msgs) else {}
        state, history = self._session_state(msgs, refs, position)
        decision = route(
            TurnRequest(turn.text, turn.attachment_ids, turn.override, turn.image_ids),
            state,
            frozenset(self.routable_skills()),
        )
        return decision, history

    @staticmethod
    def _routed_fields(decision: Decision, *, cancelled: bool) -> dict[str, object]:
        """The reply's columns once routed: stored as running at once (the routing is in the event log)."""
        return {
            "status": (p.TurnStatus.routed if cancelled else p.TurnStatus.running).value,
            "started_at": None if cancelled else utcnow(),
            "skill": decision.skill,
            "route_confidence": decision.confidence,
            "route_reason": decision.reason,
            "attachment_ids": [decision.attachment_id] if decision.attachment_id else [],
            # a /command is an override too: store it with the turn like the protocol's field
            "skill_override": decision.skill if decision.overridden else None,
        }

    @staticmethod
    def _routed_event(turn: _Turn, decision: Decision) -> p.TurnRouted:
        return p.TurnRouted(
            session_id=turn.session_id,
            turn_id=turn.turn_id,
            skill=decision.skill,
            confidence=decision.confidence,
            reason=decision.reason,
            overridden=decision.overridden,
            attachment_id=decision.attachment_id,
        )

    @staticmethod
    def _session_state(
        msgs: Sequence[ContextRow], refs: Mapping[str, AttachmentRef], position: int
    ) -> tuple[SessionState, list[HistoryItem]]:
        images = image_context(refs, messages=msgs, before=position)
        items: list[HistoryItem] = []
        last_skill = None
        for m in msgs:
            if not m.recent:  # an older turn read for the images alone (state.context)
                pass
            elif m.role == "user":
                items.append(HistoryItem("user", images.render_user(m), m.position))
            elif m.status in HISTORY_REPLY_STATUSES and m.text:
                items.append(HistoryItem("assistant", m.text, m.position))
            if m.role == "assistant" and m.skill:
                last_skill = m.skill
        # A user message whose reply failed has no answer; keep user/assistant alternating, starting
        # with the user (a history cut to what a prompt can hold may start with a reply).
        merged: list[HistoryItem] = []
        for it in items:
            if merged and merged[-1].role == it.role == "user":
                merged[-1] = it
            elif merged or it.role == "user":
                merged.append(it)
        state = SessionState(
            last_skill=last_skill,
            image_ids=images.image_ids,
            focus_image_id=images.focus_image_id,
            last_question=images.last_question,
        )
        return state, merged

    async def _run_turn(self, turn: _Turn) -> None:
        if turn.routing is None:
            turn.started = time.monotonic()
        started = turn.started
        skill_name, usage, error = None, p.Usage(), None
        status = p.TurnStatus.completed
        try:
            if turn.routing is not None:  # routed (stored and logged) as it was admitted
                decision, history = turn.routing
            else:
                # Read the session, route, and store and log the decision in one transaction.
                with self._db() as db:
                    msgs = read_context(
                        db, session_id=turn.session_id, chars=self._history_chars, before=turn.position, asked=asked
                    )
                    try:
                        decision, history = self._decide(db, turn, msgs, turn.position)
                    except UnknownSkill as exc:  # e.g. the skill was removed since the turn was queued
                        raise SkillError("skill_unknown", f"unknown skill {exc}") from None
                    store.update_reply(
                        db, message_id=turn.reply_id, **self._routed_fields(decision, cancelled=turn.cancelled)
                    )
                    frame = self._log(db, turn.session_id, self._routed_event(turn, decision))
                self._fan_out(turn.session_id, frame)
            skill_name = decision.skill
            if not turn.cancelled:
                request = SkillRequest(
                    turn.session_id,
                    turn.turn_id,
                    decision.text or turn.text,
                    tuple(history),
                    turn.attachment_ids,
                    images=await self._images_for(decision.attachment_id),
                )
                marks = [started, time.monotonic()]  # the TTFT stages' bounds (TTFT_STAGES)
                run = turn.run = await self.skills[decision.skill].run(request)
                marks.append(time.monotonic())
                if turn.cancelled:
                    run.cancel()
                self._streaming += 1
                try:
                    await self._stream(turn, run, decision.skill, marks)
                finally:
                    self._streaming -= 1
                usage = p.Usage(
                    prompt_tokens=run.usage.prompt_tokens,
                    completion_tokens=run.usage.completion_tokens,
                    cached_prompt_tokens=getattr(run.usage, "cached_prompt_tokens", 0),
                    time_to_first_token_ms=turn.ttft_ms,
                )
            if turn.cancelled:
                status = p.TurnStatus.cancelled
        except SkillError as exc:
            status, error = p.TurnStatus.failed, p.ErrorBody(code=p.ErrorCode(exc.code), message=exc.message)
        except asyncio.CancelledError:
            if turn.run is not None:
                turn.run.cancel()
            status = p.TurnStatus.cancelled if turn.cancelled else p.TurnStatus.interrupted
            self._finish(turn, status, text=turn.partial, skill=skill_name, usage=usage)
            raise
        except Exception as exc:  # noqa: BLE001 - one boundary per turn: log, fail the turn, keep serving
            log.exception("turn %s failed", turn.turn_id)
            status = p.TurnStatus.failed
            error = p.ErrorBody(code=p.ErrorCode.internal_error, message=f"internal error: {type(exc).__name__}")
        usage.duration_ms = round((time.monotonic() - started) * 1000, 2)
        # Stored and sent with the other streams' frames of this loop turn (the next queued turn of
        # the session reads the session after this commit).
        event, fields = self._done(turn, status, text=turn.partial, skill=skill_name, usage=usage, error=error)
        await self._writer.finish(event, reply_id=turn.reply_id, fields=fields)

    async def _images_for(self, attachment_id: str | None) -> tuple[bytes, ...]:
        """The bytes of the image the router resolved (read off the event loop)."""
        if attachment_id is None:
            return ()

        def read() -> bytes:
            with self._sessions() as db:
                return image_bytes(db, self.blobs, attachment_id=attachment_id)

        try:
            return (await asyncio.to_thread(read),)
        except FileNotFoundError:
            raise SkillError("attachment_not_found", f"the bytes of image {attachment_id!r} are missing") from None

    async def _stream(self, turn: _Turn, run: SkillRun, skill: str, marks: list[float]) -> None:
        """Forward deltas as coalesced frames: at most one per ``delta_flush_interval``, stretched while
        more streams run than ``delta_frames_per_s`` allows at that interval (so a busy server's event
        loop is not spent on frames). The reply text in the DB grows with each frame (written by the
        group-commit ``StreamWriter`` together with every other stream's frames). ``marks``:
        the turn's start, its skill's call and its return (``time.monotonic()``)."""
        text, pending, last_flush, first = "", "", 0.0, True
        interval = self.settings.delta_flush_interval
        cap = self.settings.delta_frames_per_s

        first_token_at = None

        async def flush() -> None:
            nonlocal pending, last_flush, first_token_at
            chunk, pending, last_flush = pending, "", time.monotonic()
            event = p.ResponseDelta(session_id=turn.session_id, turn_id=turn.turn_id, delta=chunk)
            at, first_token_at = first_token_at, None  # stored with the first frame
            await self._writer.write(event, reply_id=turn.reply_id, text=text, first_token_at=at)
            if at is not None:
                marks.append(time.monotonic())
                for stage, begin, end in zip(TTFT_STAGES, marks, marks[1:]):
                    self.metrics.ttft_stages.labels(skill, stage).observe(end - begin)

        async for delta in run:
            if turn.cancelled:
                break
            if first:
                first = False
                marks.append(time.monotonic())
                ttft = marks[-1] - marks[0]
                turn.ttft_ms = round(ttft * 1000, 2)
                self.metrics.ttft.labels(skill).observe(ttft)
                first_token_at = utcnow()
            text += delta
            turn.partial = text
            pending += delta
            # Every stream's interval stretches so that all of them together stay within the cap.
            if time.monotonic() - last_flush >= (max(interval, self._streaming / cap) if cap > 0 else interval):
                await flush()
        if pending:
            await flush()

    def _done(
        self,
        turn: _Turn,
        status: p.TurnStatus,
        *,
        text: str,
        skill: str | None,
        usage: p.Usage,
        error: p.ErrorBody | None = None,
    ) -> tuple[p.ResponseDone, dict[str, object]]:
        """Count the ended turn; returns its ``response.done`` and the reply's final columns."""
        self.metrics.turns.labels(skill or "none", status.value).inc()
        if usage.completion_tokens and skill:
            self.metrics.tokens.labels(skill).inc(usage.completion_tokens)
        if usage.duration_ms is not None and skill:
            self.metrics.turn_seconds.labels(skill).observe(usage.duration_ms / 1000)
        event = p.ResponseDone(
            session_id=turn.session_id,
            turn_id=turn.turn_id,
            status=status.value,
            text=text,
            skill=skill,
            usage=usage,
            error=error,
        )
        fields = {
            "status": status.value,
            "text": text,
            "finished_at": utcnow(),
            "error_code": error.code.value if error else None,
            "prompt_tokens": usage.prompt_tokens or None,
            "completion_tokens": usage.completion_tokens or None,
        }
        return event, fields

    def _finish(self, turn: _Turn, status: p.TurnStatus, *, text: str, skill: str | None, usage: p.Usage) -> None:
        """End a turn that never ran or was stopped, in a transaction of its own (not awaited)."""
        event, fields = self._done(turn, status, text=text, skill=skill, usage=usage)
        self._writer.ended(turn.session_id, turn.turn_id)
        self._publish(turn.session_id, event, lambda db: store.update_reply(db, message_id=turn.reply_id, **fields))

    # ------------------------------------------------------------------ start-up and shut-down

    def recover(self) -> int:
        """Mark turns left unfinished by a crash as ``interrupted`` (logged, so resuming clients see
        it), and go on removing the rows of sessions deleted before the last shutdown. Runs on the loop."""
        with self._db() as db:
            deleted = set(store.deleted_sessions(db))
            stale = [(m.session_id, m.turn_id, m.id, m.text) for m in store.unfinished_replies(db) if m.session_id not in deleted]
        for session_id in deleted:
            self._purge(session_id)
        for session_id, turn_id, reply_id, text in stale:
            self._publish(
                session_id,
                p.ResponseDone(session_id=session_id, turn_id=turn_id, status="interrupted", text=text),
                lambda db, rid=reply_id: store.update_reply(
                    db, message_id=rid, status=p.TurnStatus.interrupted.value, finished_at=utcnow()
                ),
            )
        return len(stale)

    async def shutdown(self) -> None:
        purges = list(self._purges)
        for purge in purges:  # the next start goes on with it
            purge.cancel()
        await asyncio.gather(*purges, return_exceptions=True)
        tasks = [r.task for r in self._runners.values() if r.task is not None and not r.task.done()]
        for r in self._runners.values():
            for turn in list(r.queue):
                self._finish(turn, p.TurnStatus.interrupted, text="", skill=None, usage=p.Usage())
            r.queue.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runners.clear()
