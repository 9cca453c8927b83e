"""The AsyncAPI 3.0 document for the websocket, generated from ``assistant.protocol``."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from assistant import __version__
from assistant import protocol as p

_DESCRIPTION = """\
One websocket per client at `/v1/ws`. Authenticate with `Authorization: Bearer <token>` or, from a
browser, `?token=<token>`. The server first sends `server.hello` (protocol version, skills, limits).
Every frame is one JSON event with a `type`. Events of a session carry `seq`, monotonic per session:
after a reconnect send `session.resume` with the last `seq` you saw and the server replays what you
missed, then streams live (with `batch: true`, the missed events come grouped in `session.replay`
frames). Every bad frame gets an `error` event with a stable `code` and your
`event_id`; the connection stays usable unless it was closed with code 4401 (unauthorized).
Binary frames carry audio: after `audio.start`, raw PCM16 little-endian mono 16 kHz samples
(`AudioFrame`), appended to the connection's buffer until `audio.commit` or `audio.clear`."""

# The one binary message: microphone audio after ``audio.start``.
AUDIO_FRAME = {
    "name": "audio.frame",
    "title": "audio frame (binary)",
    "summary": "Raw PCM16 little-endian mono 16 kHz samples for the buffer opened by audio.start.",
    "contentType": "application/octet-stream",
    "payload": {"type": "string", "format": "binary"},
}


def _members(union: Any) -> list[type[BaseModel]]:
    inner = typing.get_args(union)[0]  # Annotated[Union[...], Field(...)]
    return list(typing.get_args(inner))


def build_asyncapi(server_url: str = "localhost:8000") -> dict[str, Any]:
    client, server = _members(p.ClientEvent), _members(p.ServerEvent)
    _, defs = models_json_schema(
        [(m, "validation") for m in client] + [(m, "serialization") for m in server],
        ref_template="#/components/schemas/{model}",
    )
    schemas = defs.get("$defs", {})

    def message(model: type[BaseModel]) -> dict[str, Any]:
        kind = model.model_fields["type"].default
        return {
            "name": kind,
            "title": kind,
            "summary": (model.__doc__ or kind).strip().splitlines()[0],
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
        }

    messages = {m.__name__: message(m) for m in client + server}
    messages["AudioFrame"] = AUDIO_FRAME
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Assistant websocket protocol",
            "version": p.PROTOCOL_VERSION,
            "description": _DESCRIPTION,
            "x-server-version": __version__,
        },
        "servers": {"local": {"host": server_url, "protocol": "ws", "pathname": "/v1/ws"}},
        "channels": {
            "session": {
                "address": "/v1/ws",
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": {
            "sendClientEvent": {
                "action": "receive",
                "channel": {"$ref": "#/channels/session"},
                "summary": "Events a client sends to the server.",
                "messages": [
                    {"$ref": f"#/channels/session/messages/{name}"} for name in [m.__name__ for m in client] + ["AudioFrame"]
                ],
            },
            "receiveServerEvent": {
                "action": "send",
                "channel": {"$ref": "#/channels/session"},
                "summary": "Events the server sends to a client.",
                "messages": [{"$ref": f"#/channels/session/messages/{m.__name__}"} for m in server],
            },
        },
        "components": {"schemas": schemas, "messages": messages},
    }
