"""Authentication (websocket and REST) and isolation between users' sessions."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import Client, LiveServer, ws_client

# ----------------------------------------------------------------------------- helpers


def api(server: LiveServer, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.http, headers=headers, timeout=30)


def assert_not_found(resp: httpx.Response) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.json()["detail"]["code"] == "session_not_found", resp.text


def assert_unauthorized(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.json()["detail"]["code"] == "unauthorized", resp.text
    assert resp.headers["www-authenticate"] == "Bearer"


def session_ids(server: LiveServer, token: str) -> set[str]:
    with api(server, token) as http:
        resp = http.get("/v1/sessions")
        assert resp.status_code == 200, resp.text
        return {s["id"] for s in resp.json()["sessions"]}


def create_session(server: LiveServer, token: str, title: str) -> dict:
    with api(server, token) as http:
        resp = http.post("/v1/sessions", json={"title": title})
        assert resp.status_code == 201, resp.text
        return resp.json()


def history(server: LiveServer, token: str, session_id: str) -> dict:
    with api(server, token) as http:
        resp = http.get(f"/v1/sessions/{session_id}/messages")
        assert resp.status_code == 200, resp.text
        return resp.json()


async def refused_connection(url: str, **connect_kwargs: object) -> tuple[dict, int]:
    """Open a websocket that the server refuses: returns (the one event it sent, the close code)."""
    async with connect(url, **connect_kwargs) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        try:
            extra = await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None, "the server closes with a code"
            return first, closed.rcvd.code
        raise AssertionError(f"the connection stayed open and sent {extra!r}")


async def ping(client: Client) -> None:
    """The very next event after a ping is its pong: the connection works and nothing else arrived."""
    await client.send(type="ping", event_id="p")
    assert await client.recv() == {"type": "pong", "event_id": "p"}


@pytest.fixture(scope="module")
def alice(server: LiveServer) -> str:
    return server.token("alice")


@pytest.fixture(scope="module")
def bob(server: LiveServer) -> str:
    return server.token("bob")


# ----------------------------------------------------------------------------- websocket auth


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"Authorization": "Bearer ast_not-a-real-token"}, id="wrong-token"),
        pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
        pytest.param({"Authorization": "Basic YWxpY2U6cHc="}, id="not-bearer"),
    ],
)
def test_websocket_without_valid_token_gets_unauthorized_then_4401(server: LiveServer, headers: dict) -> None:
    first, code = asyncio.run(refused_connection(server.ws_url, additional_headers=headers))
    assert first["type"] == "error" and first["code"] == "unauthorized", first
    assert code == 4401


def test_websocket_with_wrong_query_token_is_refused(server: LiveServer) -> None:
    first, code = asyncio.run(refused_connection(f"{server.ws_url}?token=ast_wrong"))
    assert first["code"] == "unauthorized", first
    assert code == 4401


def test_websocket_with_truncated_token_is_refused(server: LiveServer, alice: str) -> None:
    """A token is checked whole: a prefix of a valid one does not authenticate."""
    first, code = asyncio.run(refused_connection(f"{server.ws_url}?token={alice[:-1]}"))
    assert first["code"] == "unauthorized", first
    assert code == 4401


def test_websocket_token_in_query_works(server: LiveServer, alice: str) -> None:
    async def scenario() -> None:
        async with connect(f"{server.ws_url}?token={alice}") as ws:
            client = Client(ws)
            hello = await client.recv()
            assert hello["type"] == "server.hello" and hello["user"] == "alice", hello
            await ping(client)
            sid = await client.new_session()
            assert sid in session_ids(server, alice)

    asyncio.run(scenario())


def test_websocket_header_token_identifies_the_user(server: LiveServer, bob: str) -> None:
    async def scenario() -> None:
        async with ws_client(server, bob) as client:
            assert client.hello["type"] == "server.hello" and client.hello["user"] == "bob", client.hello

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- REST auth


@pytest.mark.parametrize("token", [None, "ast_not-a-real-token"], ids=["no-token", "wrong-token"])
def test_rest_without_valid_token_is_401(server: LiveServer, token: str | None) -> None:
    with api(server, token) as http:
        assert_unauthorized(http.get("/v1/sessions"))
        assert_unauthorized(http.post("/v1/sessions", json={}))
        assert_unauthorized(http.get(f"/v1/sessions/{'0' * 32}/messages"))


def test_rest_ignores_query_token(server: LiveServer, alice: str) -> None:
    """``?token=`` is only for browsers' websockets; REST needs the header."""
    with api(server, None) as http:
        assert_unauthorized(http.get("/v1/sessions", params={"token": alice}))


def test_rest_with_valid_token_lists_sessions(server: LiveServer, alice: str) -> None:
    created = create_session(server, alice, "mine")
    assert created["title"] == "mine"
    assert created["id"] in session_ids(server, alice)


# ----------------------------------------------------------------------------- isolation


def test_another_user_cannot_see_or_touch_a_session(server: LiveServer, alice: str, bob: str) -> None:
    sid = create_session(server, alice, "alice's secrets")["id"]
    assert sid not in session_ids(server, bob)
    with api(server, bob) as http:
        assert_not_found(http.get(f"/v1/sessions/{sid}/messages"))
        assert_not_found(http.patch(f"/v1/sessions/{sid}", json={"title": "x"}))
        assert_not_found(http.delete(f"/v1/sessions/{sid}"))
    after = history(server, alice, sid)
    assert after["session"]["title"] == "alice's secrets"
    assert sid in session_ids(server, alice)


def test_another_user_cannot_turn_or_cancel_over_the_websocket(server: LiveServer, alice: str, bob: str) -> None:
    async def scenario() -> None:
        async with ws_client(server, alice) as alice_ws, ws_client(server, bob) as bob_ws:
            sid = await alice_ws.new_session()
            turn_id, done = await alice_ws.turn(sid, "hello")
            assert done["status"] == "completed", done
            before = history(server, alice, sid)

            for event in (
                dict(type="turn.create", session_id=sid, text="let me in"),
                dict(type="response.cancel", session_id=sid, turn_id=turn_id),
            ):
                eid = await bob_ws.send(**event)
                err = await bob_ws.recv()
                assert err["type"] == "error" and err["code"] == "session_not_found", err
                assert err["event_id"] == eid
                await ping(bob_ws)

            assert history(server, alice, sid) == before
            await ping(alice_ws)  # alice saw nothing of bob's attempts

    asyncio.run(scenario())


def test_owner_can_rename_and_delete(server: LiveServer, alice: str) -> None:
    sid = create_session(server, alice, "before")["id"]
    with api(server, alice) as http:
        renamed = http.patch(f"/v1/sessions/{sid}", json={"title": "after"})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["title"] == "after"
        assert history(server, alice, sid)["session"]["title"] == "after"

        deleted = http.delete(f"/v1/sessions/{sid}")
        assert deleted.status_code == 204, deleted.text
        assert_not_found(http.get(f"/v1/sessions/{sid}/messages"))
        assert_not_found(http.delete(f"/v1/sessions/{sid}"))
    assert sid not in session_ids(server, alice)


def test_deleted_session_with_history_is_gone_for_the_websocket_too(server: LiveServer, alice: str) -> None:
    async def scenario() -> None:
        async with ws_client(server, alice) as client:
            sid = await client.new_session()
            await client.turn(sid, "hello")
            with api(server, alice) as http:
                assert http.delete(f"/v1/sessions/{sid}").status_code == 204
            eid = await client.send(type="turn.create", session_id=sid, text="again")
            err = await client.until(lambda e: e.get("event_id") == eid)
            assert err["type"] == "error" and err["code"] == "session_not_found", err

    asyncio.run(scenario())
