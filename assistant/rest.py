"""REST routes: sessions and their history. Thin: the store does the work."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, Field

from assistant.auth import User
from assistant.dialogue import session_info
from assistant.protocol import SessionInfo
from state import store

router = APIRouter(prefix="/v1", tags=["sessions"])


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class NewSession(BaseModel):
    title: str | None = Field(default=None, max_length=200)


class Rename(BaseModel):
    title: str = Field(min_length=1, max_length=200)


class MessageOut(BaseModel):
    id: str
    position: int  # 0, 1, 2, ... in the session: ``before`` of the next page
    turn_id: str
    role: str
    text: str
    input: str = "text"  # "speech" when the user spoke it and it was transcribed
    status: str
    skill: str | None
    route_confidence: float | None
    route_reason: str | None
    skill_override: str | None
    error_code: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attachment_ids: list[str]
    created_at: str | None
    started_at: str | None
    first_token_at: str | None
    finished_at: str | None


class History(BaseModel):
    session: SessionInfo
    last_seq: int
    messages: list[MessageOut]
    has_more: bool = False  # older messages than these exist (with ``limit``)


def _not_found(session_id: str) -> HTTPException:
    return HTTPException(
        status.HTTP_404_NOT_FOUND, detail={"code": "session_not_found", "message": f"no session {session_id!r}"}
    )


@router.get("/sessions", response_model=SessionList)
def list_sessions(request: Request, user: User, limit: int = 100, offset: int = 0) -> SessionList:
    with request.app.state.sessions() as db:
        rows = store.list_sessions(db, user_id=user.id, limit=min(max(limit, 1), 500), offset=max(offset, 0))
        return SessionList(sessions=[session_info(s) for s in rows])


@router.post("/sessions", response_model=SessionInfo, status_code=201)
async def create_session(request: Request, user: User, body: NewSession | None = None) -> SessionInfo:
    dialogue = request.app.state.dialogue
    sid = dialogue.create_session(user_id=user.id, title=body.title if body else None, sub=None, event_id=None)
    with request.app.state.sessions() as db:
        return session_info(store.get_session(db, session_id=sid, user_id=user.id))


@router.get("/sessions/{session_id}/messages", response_model=History)
def read_history(
    request: Request,
    user: User,
    session_id: str,
    limit: Annotated[int | None, Query(ge=1, le=1000, description="The newest this many messages (default: all)")] = None,
    before: Annotated[int | None, Query(ge=0, description="Only messages before this position (the next page)")] = None,
) -> History:
    """The session's messages in order; with ``limit``, a page of the newest ones (before ``before``)."""
    with request.app.state.sessions() as db:
        sess = store.get_session(db, session_id=session_id, user_id=user.id)
        if sess is None:
            raise _not_found(session_id)
        msgs = store.history(db, session_id=session_id, before=before, limit=limit)
        has_more = limit is not None and bool(msgs) and msgs[0].position > 0
        out = [
            MessageOut(
                **{k: getattr(m, k) for k in MessageOut.model_fields if not k.endswith("_at")},
                **{k: store.as_iso(getattr(m, k)) for k in MessageOut.model_fields if k.endswith("_at")},
            )
            for m in msgs
        ]
        return History(session=session_info(sess), last_seq=sess.last_seq, messages=out, has_more=has_more)


@router.patch("/sessions/{session_id}", response_model=SessionInfo)
def rename_session(request: Request, user: User, session_id: str, body: Rename) -> SessionInfo:
    with request.app.state.sessions.begin() as db:
        sess = store.get_session(db, session_id=session_id, user_id=user.id)
        if sess is None:
            raise _not_found(session_id)
        store.rename_session(db, session=sess, title=body.title.strip() or sess.title)
        db.flush()
        return session_info(sess)


@router.delete("/sessions/{session_id}", status_code=204)
async def delete_session(request: Request, user: User, session_id: str) -> Response:
    if not await request.app.state.dialogue.delete_session(user_id=user.id, session_id=session_id):
        raise _not_found(session_id)
    return Response(status_code=204)
