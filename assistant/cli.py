"""The ``assistant`` command: serve, tokens, database."""

from __future__ import annotations

import argparse
import logging
import sys


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from assistant.settings import Settings

    overrides = {k: v for k, v in {"host": getattr(args, "host", None), "port": getattr(args, "port", None)}.items() if v}
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from assistant.server import create_app

    settings = _settings(args)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        ws_max_size=max(4 * settings.max_frame_bytes, 1 << 20),
    )
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from state import db as state_db
    from state import store

    settings = _settings(args)
    engine = state_db.make_engine(settings.database_url)
    state_db.upgrade(engine)
    with state_db.make_session_factory(engine).begin() as db:
        user = store.get_or_create_user(db, name=args.user)
        token = store.create_token(db, user=user, label=args.label)
    print(token)
    print(f"login URL: http://{settings.host}:{settings.port}/#token={token}", file=sys.stderr)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from state import db as state_db

    settings = _settings(args)
    state_db.upgrade(state_db.make_engine(settings.database_url))
    print(f"database at {settings.database_url} is at the newest schema")
    return 0


def cmd_asyncapi(_args: argparse.Namespace) -> int:
    import json

    from assistant.asyncapi import build_asyncapi

    print(json.dumps(build_asyncapi(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assistant", description="Self-hosted multimodal assistant")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (settings from ASSISTANT_* environment variables)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="manage access tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a user (if new) and print a bearer token for it")
    create.add_argument("--user", default="owner")
    create.add_argument("--label", default="cli")
    create.set_defaults(func=cmd_token_create)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="migrate the database to the newest schema").set_defaults(func=cmd_db_upgrade)

    sub.add_parser("asyncapi", help="print the websocket protocol's AsyncAPI document").set_defaults(func=cmd_asyncapi)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
