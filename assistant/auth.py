"""Bearer-token authentication for REST (``Authorization`` header) and the websocket
(the header, or ``?token=`` for browsers, which cannot set headers on a websocket)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session, sessionmaker

from state import store


@dataclass(frozen=True)
class CurrentUser:
    id: str
    name: str


def token_from(authorization: str | None, query_token: str | None) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None


def authenticate(sessions: sessionmaker[Session], token: str | None) -> CurrentUser | None:
    if not token:
        return None
    with sessions() as db:
        user = store.user_for_token(db, token=token)
        return CurrentUser(user.id, user.name) if user else None


def _rest_user(request: Request) -> CurrentUser:
    token = token_from(request.headers.get("authorization"), None)
    user = authenticate(request.app.state.sessions, token)
    if user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"code": "unauthorized", "message": "a valid bearer token is required"},
            headers={"WWW-Authenticate": "Bearer"},
        )
    return user


User = Annotated[CurrentUser, Depends(_rest_user)]
