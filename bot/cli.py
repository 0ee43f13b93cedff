"""The `banryeo` command.

    banryeo run                       # every configured platform (DISCORD_TOKEN, TELEGRAM_TOKEN); none: the console
    banryeo chat                      # the console chat
    banryeo persona list              # built-in and imported personas
    banryeo persona import card.png   # a SillyTavern character card (PNG or JSON)
    banryeo model prepare             # convert the embedded model once (run does this on first start)
    banryeo config                    # the effective settings (tokens hidden)
    banryeo stats                     # what the database holds
    banryeo backup /backups           # online backup: database, generations, personas (restore: README)
    banryeo picks import FILE.jsonl   # picks made elsewhere, stored as live ones ('-': stdin; --dry-run: check only)

Scale-out serving (bot/vllm_server.py):
    banryeo vllm install [--gpu]      # a virtualenv with vLLM (CPU build; --gpu: CUDA) in serving.vllm_venv
    banryeo vllm serve [--port 8000]  # a local vLLM for the configured model, user adapters loadable at runtime
    banryeo vllm command              # print that server command instead of running it

Learning (admin):
    banryeo status                             # as /status: serving generations, the last night's progress
    banryeo train [--lineage ID] [--force]     # run the nightly rollover now
    banryeo generations LINEAGE                # generations with their gate metrics
    banryeo learned LINEAGE                    # the serving generation against its parent
    banryeo promote LINEAGE N                  # serve generation N ("base" for the base model)
    banryeo rollback LINEAGE [N]               # back to the parent (or to N)
    banryeo chart LINEAGE FILE.png             # metrics across generations

Global options: --config FILE (default ./banryeo.toml when present), -v for debug logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from bot.config import ConfigError, Settings, load_settings

logger = logging.getLogger("banryeo")


def build_engine(settings: Settings):
    """Open the store, the personas and the model, and wire them into a dialogue engine."""
    from bot.engine import DialogueEngine
    from bot.store import Store
    from persona import PersonaLibrary

    personas = PersonaLibrary(settings.storage.persona_dir)
    personas.get(settings.chat.persona)  # fail early on a bad default persona
    store = Store(settings.storage.db_path)
    if settings.serving.backend == "vllm":
        from bot.serving.vllm import VllmGenerator
        from bot.tokenizer import PromptTokenizer

        if not settings.serving.vllm_url:
            raise ConfigError("serving.backend = 'vllm' needs serving.vllm_url (e.g. http://gpu-box:8000)")
        logger.info("Loading the tokenizer of %s ...", settings.model.name)
        backend = PromptTokenizer.load(settings.model)  # counts tokens and renders chat templates; no weights
        key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
        generator = VllmGenerator(settings.serving, settings.model.name, settings.storage.generations_dir, key,
                                  add_special_tokens=not backend.use_chat_template)
    else:  # the default: sample in this process, on the model's own thread (bot/serving/local.py)
        from bot.serving import LocalGenerator

        logger.info("Loading the model %s ...", settings.model.name)
        generator = LocalGenerator.load(settings.model, settings.serving)
        backend = generator.backend
    return DialogueEngine(store, backend, personas, settings, generator)


async def serve(engine, settings: Settings, console: bool) -> None:
    """Every configured platform (or the console chat), with the nightly rollover scheduled beside."""
    from bot.admin import Admin
    from bot.console import ConsoleChat
    from schedules.nightly import NightlyRollover

    nightly = NightlyRollover(settings, engine.store) if settings.schedule.enabled else None
    if nightly is not None:
        nightly.start()
    admin = Admin(engine.store, settings, nightly)
    platforms = []
    if settings.discord_token is not None and not console:
        from bot.discord_bot import create_discord_bot

        discord_bot = create_discord_bot(engine, admin, settings)
        platforms.append(run_discord(discord_bot, settings.discord_token.get_secret_value()))
    if settings.telegram_token is not None and not console:
        from bot.telegram_bot import TelegramCompanion, build_application, run_telegram

        companion = TelegramCompanion(engine, admin, settings)
        application = build_application(companion, settings.telegram_token.get_secret_value())
        platforms.append(run_telegram(application, companion, settings))
    try:
        if platforms:  # one event loop, one engine; if one platform fails to start, the others stop too
            async with asyncio.TaskGroup() as group:
                for platform in platforms:
                    group.create_task(platform)
        else:
            await ConsoleChat(engine).run()
    finally:
        if nightly is not None:
            nightly.shutdown()
        if hasattr(engine.generator, "aclose"):  # a remote generator closes its connections in the loop
            await engine.generator.aclose()


async def run_discord(discord_bot, token: str) -> None:
    import discord

    try:
        async with discord_bot:  # closes the connection and HTTP session however the run ends
            await discord_bot.start(token)
    except discord.LoginFailure as exc:
        raise ConfigError(f"Discord refused DISCORD_TOKEN: {exc}") from None


def serve_until_stopped(settings: Settings, console: bool) -> int:
    engine = build_engine(settings)
    try:
        asyncio.run(serve(engine, settings, console=console))
    except* ConfigError as group:  # a platform refused its token or its settings
        raise group.exceptions[0] from None
    finally:
        engine.close()
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Every configured platform; the console chat when none is."""
    return serve_until_stopped(settings, console=False)


def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    """The console chat only, whatever else is configured."""
    return serve_until_stopped(settings, console=True)


def cmd_persona(settings: Settings, args: argparse.Namespace) -> int:
    from persona import PersonaLibrary, import_card

    library = PersonaLibrary(settings.storage.persona_dir)
    if args.action == "list":
        for key in library.keys():
            card = library.get(key)
            marker = "*" if key == settings.chat.persona else " "
            print(f"{marker} {key:12} {card.name} ({card.language})")
    elif args.action == "show":
        from persona import dump_card

        print(dump_card(library.get(args.target)))
    elif args.action == "import":
        card = import_card(args.target)
        if args.key:
            card.key = args.key
        path = library.save(card)
        print(f"imported '{card.name}' as {card.key} -> {path}")
    return 0


def cmd_model(settings: Settings, args: argparse.Namespace) -> int:
    from bot.model import resolve_model_path

    print(resolve_model_path(settings.model))
    return 0


def cmd_vllm(settings: Settings, args: argparse.Namespace) -> int:
    import shlex

    from bot.vllm_server import VllmServer, VllmServerError, install, installed, served_name, server_command

    venv = settings.serving.vllm_venv
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    try:
        if args.action == "install":
            install(venv, gpu=args.gpu)
            print(f"vLLM is installed in {venv.expanduser()}; start it with: banryeo vllm serve")
            return 0
        if installed(venv) is None:
            print(f"banryeo: no vLLM in {venv.expanduser()}: run `banryeo vllm install` first (--gpu for CUDA)",
                  file=sys.stderr)
            return 1
        argv, env = server_command(settings, port=args.port, host=args.host, max_loras=args.max_loras, extra=extra)
        if args.action == "command":
            key = " VLLM_API_KEY=..." if "VLLM_API_KEY" in env else ""
            print(f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True{key} " + shlex.join(argv))
            return 0
        server = VllmServer(argv, env, settings.storage.data_dir.expanduser() / "vllm.log", host=args.host,
                            port=args.port)
        print(f"Starting vLLM for {settings.model.name} (log: {server.log_path}) ...", flush=True)
        with server:
            print(f"vLLM serves {served_name(settings)!r} at {server.url}. For the bot, in banryeo.toml:\n"
                  f'  [serving]\n  backend = "vllm"\n  vllm_url = "{server.url}"\nCtrl-C stops it.', flush=True)
            return server.process.wait()
    except VllmServerError as exc:
        print(f"banryeo: {exc}", file=sys.stderr)
        return 1


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print(settings.model_dump_json(indent=2))
    return 0


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    from bot.store import Store

    for table, count in Store(settings.storage.db_path).stats().items():
        print(f"{table:16} {count}")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    """What /status shows admins: serving generations and the last night's progress and failures."""
    print(_admin(settings).status_text())
    return 0


def _admin(settings: Settings):
    from bot.admin import Admin
    from bot.store import Store

    return Admin(Store(settings.storage.db_path), settings)


def cmd_train(settings: Settings, args: argparse.Namespace) -> int:
    from training.rollover import main as rollover_main

    argv = (["--force"] if args.force else []) + (["--lineage", args.lineage] if args.lineage else [])
    if args.config:
        argv += ["--config", str(args.config)]
    return rollover_main(argv)


def cmd_generations(settings: Settings, args: argparse.Namespace) -> int:
    admin = _admin(settings)
    serving = admin.store.serving(args.lineage)
    rows = admin.generations(args.lineage)
    if not rows:
        print(f"{args.lineage}: no generations yet (serving the base model)")
    for g in rows:
        m = g["metrics"]
        mark = "*" if serving and serving["id"] == g["id"] else " "
        print(f"{mark} gen-{g['number']:<4} {g['status']:9} {g['created_at'][:16]}  "
              f"accuracy {m.get('accuracy', 0):.2f} (base {m.get('accuracy_base', 0):.2f})  "
              f"distinct-2 {m.get('distinct2', 0):.3f} (base {m.get('distinct2_base', 0):.3f})  "
              f"KL {m.get('kl_per_token', 0):.3f}" + (f"  - {g['reason']}" if g["reason"] else ""))
    return 0


def cmd_learned(settings: Settings, args: argparse.Namespace) -> int:
    report = _admin(settings).learned(args.lineage)
    if report["serving"] == "base":
        print(f"{args.lineage} serves the base model; nothing learned yet")
        return 0
    print(f"{args.lineage}: gen-{report['serving']} against {report['compared_with']}")
    for key, (before, after) in report["metrics"].items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"  {key:14} {fmt(before):>8} -> {fmt(after)}")
    for samples in report["examples"]:
        print("  e.g. " + " | ".join(samples))
    return 0


def cmd_promote(settings: Settings, args: argparse.Namespace) -> int:
    number = None if args.number == "base" else int(args.number)
    print(f"{args.lineage} now serves {_admin(settings).promote(args.lineage, number)}")
    return 0


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    print(f"{args.lineage} now serves {_admin(settings).rollback(args.lineage, args.number)}")
    return 0


def cmd_chart(settings: Settings, args: argparse.Namespace) -> int:
    print(_admin(settings).chart(args.lineage, args.file))
    return 0


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    """An online backup: the database via SQLite's backup API, plus generations and imported personas.
    `--purge-user` deletes one user from every backup in the folder instead; `--keep-days` expires old ones."""
    import shutil
    from datetime import datetime

    from bot.store import Store

    folder = args.folder.expanduser()
    if args.purge_user:
        for backup in sorted(folder.glob("banryeo-*/banryeo.db")):
            purge_from_backup(settings, backup.parent, args.purge_user)
            print(f"{backup.parent}: {args.purge_user} deleted")
        return 0
    data_dir = settings.storage.data_dir.expanduser()
    target = folder / f"banryeo-{datetime.now():%Y%m%d-%H%M%S}"
    partial = target.with_name(target.name + ".partial")
    store = Store(settings.storage.db_path)
    try:
        store.backup(partial / "banryeo.db")
    finally:
        store.close()
    for name in ("generations", "personas"):  # generation folders are immutable once renamed into place
        if (data_dir / name).exists():
            shutil.copytree(data_dir / name, partial / name, ignore=shutil.ignore_patterns(".partial-*"))
    partial.rename(target)
    print(target)
    if args.keep_days is not None:
        cutoff = datetime.now().timestamp() - args.keep_days * 86400
        for old in folder.glob("banryeo-*"):
            if old != target and old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old)
                print(f"expired {old}")
    return 0


def purge_from_backup(settings: Settings, backup: Path, user_id: str) -> None:
    """Delete one user from a backup folder as /forget would: their rows and their own generations."""
    from bot.generations import forget_generations
    from bot.store import Store

    in_backup = settings.model_copy(update={"storage": settings.storage.model_copy(update={"data_dir": backup})})
    store = Store(in_backup.storage.db_path)
    try:
        store.forget_user(user_id)
        forget_generations(store, in_backup, user_id)
    finally:
        store.close()


def cmd_picks(settings: Settings, args: argparse.Namespace) -> int:
    """Import pick records (format: bot/picks_import.py) all or nothing; every bad line is named on stderr."""
    import sqlite3
    from collections import Counter

    from bot.picks_import import (ImportRules, ImportSummary, PickImportError, import_pick_records,
                                  load_prompt_backend, read_pick_lines, read_text_lines)
    from bot.store import Store

    source = "standard input" if args.file == "-" else args.file
    store = Store(settings.storage.db_path)
    try:
        records = read_pick_lines(read_text_lines(args.file), ImportRules.of(store, settings), source)
        if args.dry_run:
            for user, count in sorted(Counter(record["user"] for record in records).items()):
                print(f"  {user:24} {_count(count, 'pick')}")
            summary = ImportSummary.of(records)
            print(f"would import {_count(summary.picks, 'pick')} for {_count(summary.users, 'user')} (dry run)")
            return 0
        backend = load_prompt_backend(settings.model)  # the tokenizer alone: prompts are built, not sampled
        summary = import_pick_records(store, settings, records, backend.count_tokens,
                                      chat_template=backend.chat_prompt if backend.use_chat_template else None,
                                      special_tokens=backend.special_tokens)
    except PickImportError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        print(f"banryeo: nothing imported from {source}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # the transaction was rolled back
        print(f"banryeo: nothing imported from {source}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"imported {_count(summary.picks, 'pick')} for {_count(summary.users, 'user')}")
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="banryeo", description="Banryeo (반려지능): a companion that learns from your picks")
    parser.add_argument("--config", type=Path, help="TOML config file (default: ./banryeo.toml when present)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start every configured platform (none: the console chat)").set_defaults(func=cmd_run)
    sub.add_parser("chat", help="chat in this terminal").set_defaults(func=cmd_chat)
    persona = sub.add_parser("persona", help="list, show or import personas")
    persona.add_argument("action", choices=["list", "show", "import"])
    persona.add_argument("target", nargs="?", help="persona key (show) or card file (import)")
    persona.add_argument("--key", help="key to store an imported card under")
    persona.set_defaults(func=cmd_persona)
    model = sub.add_parser("model", help="prepare the configured model (converts the embedded one once)")
    model.add_argument("action", choices=["prepare"])
    model.set_defaults(func=cmd_model)
    vllm = sub.add_parser("vllm", help="install or start a local vLLM server for the configured model")
    vllm.add_argument("action", choices=["install", "serve", "command"])
    vllm.add_argument("--gpu", action="store_true", help="install: the CUDA build instead of the CPU build")
    vllm.add_argument("--host", default="127.0.0.1")
    vllm.add_argument("--port", type=int, default=8000)
    vllm.add_argument("--max-loras", type=int, default=8, help="users' adapters one batch may mix")
    vllm.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more vLLM flags, passed as they are")
    vllm.set_defaults(func=cmd_vllm)
    sub.add_parser("config", help="print the effective settings").set_defaults(func=cmd_config)
    sub.add_parser("stats", help="print what the database holds").set_defaults(func=cmd_stats)
    sub.add_parser("status", help="what /status shows: serving generations, the night's progress") \
        .set_defaults(func=cmd_status)
    train = sub.add_parser("train", help="run the nightly rollover now")
    train.add_argument("--lineage")
    train.add_argument("--force", action="store_true", help="train even with few new picks")
    train.set_defaults(func=cmd_train)
    for name, func, text in (("generations", cmd_generations, "list a lineage's generations"),
                             ("learned", cmd_learned, "what the serving generation learned")):
        command = sub.add_parser(name, help=text)
        command.add_argument("lineage", help="a user id such as discord:1234, or 'shared'")
        command.set_defaults(func=func)
    promote = sub.add_parser("promote", help="serve a generation")
    promote.add_argument("lineage")
    promote.add_argument("number", help="generation number, or 'base'")
    promote.set_defaults(func=cmd_promote)
    rollback = sub.add_parser("rollback", help="serve the parent generation (or a named one)")
    rollback.add_argument("lineage")
    rollback.add_argument("number", nargs="?", type=int)
    rollback.set_defaults(func=cmd_rollback)
    backup = sub.add_parser("backup", help="consistent backup of the database, generations and personas")
    backup.add_argument("folder", type=Path, help="where to put banryeo-<date>-<time>/")
    backup.add_argument("--keep-days", type=int, metavar="N", help="then delete backups older than N days there")
    backup.add_argument("--purge-user", metavar="USER", help="instead delete a user (e.g. telegram:42) from "
                        "every backup in the folder, as /forget does")
    backup.set_defaults(func=cmd_backup)
    chart = sub.add_parser("chart", help="PNG chart of a lineage's generations")
    chart.add_argument("lineage")
    chart.add_argument("file", type=Path)
    chart.set_defaults(func=cmd_chart)
    picks = sub.add_parser("picks", help="import picks made elsewhere (JSONL) for the nightly training")
    picks.add_argument("action", choices=["import"])
    picks.add_argument("file", help="a JSONL file of pick records, '-' for standard input (format: README)")
    picks.add_argument("--dry-run", action="store_true", help="check every line and store nothing")
    picks.set_defaults(func=cmd_picks)
    return parser


def configure_logging(verbose: bool = False) -> None:
    """INFO by default. Tokens and message texts never appear at that level: our own log lines name
    users and generations, not what they said, and httpx (which logs every Bot API URL, token
    included) is kept to warnings."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose and noisy == "httpx" else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    configure_logging(args.verbose)
    umask = os.umask(0o077)  # every file and folder Banryeo writes (database, backups, adapters) is this user's
    try:
        return _run(args)
    finally:
        os.umask(umask)


def _run(args: argparse.Namespace) -> int:
    from bot.generations import GenerationError
    from bot.model import ModelError
    from bot.store import StoreError
    from persona import PersonaError

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # undecodable input bytes become U+FFFD instead of a crash
    if args.command in ("persona",) and args.action in ("show", "import") and not args.target:
        print(f"banryeo persona {args.action}: which {'persona' if args.action == 'show' else 'file'}?",
              file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
        return args.func(settings, args)
    except (ConfigError, ModelError, StoreError, PersonaError, GenerationError) as exc:
        print(f"banryeo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
