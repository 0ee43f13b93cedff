"""The `banryeo` command.

    banryeo run                       # every configured platform; none configured: the console chat
    banryeo chat                      # the console chat
    banryeo persona list              # built-in and imported personas
    banryeo persona import card.png   # a SillyTavern character card (PNG or JSON)
    banryeo model prepare             # convert the embedded model once (run does this on first start)
    banryeo config                    # the effective settings (tokens hidden)
    banryeo stats                     # what the database holds

Global options: --config FILE (default ./banryeo.toml when present), -v for debug logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from bot.config import ConfigError, Settings, load_settings

logger = logging.getLogger("banryeo")


def build_engine(settings: Settings):
    """Open the store, the personas and the model, and wire them into a dialogue engine."""
    from bot.engine import DialogueEngine
    from bot.model import ModelBackend
    from bot.store import Store
    from persona import PersonaLibrary

    personas = PersonaLibrary(settings.storage.persona_dir)
    personas.get(settings.chat.persona)  # fail early on a bad default persona
    store = Store(settings.storage.db_path)
    logger.info("Loading the model %s ...", settings.model.name)
    backend = ModelBackend.load(settings.model)
    return DialogueEngine(store, backend, personas, settings)


def cmd_chat(settings: Settings, args: argparse.Namespace) -> int:
    from bot.console import ConsoleChat

    engine = build_engine(settings)
    try:
        asyncio.run(ConsoleChat(engine).run())
    finally:
        engine.close()
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    configured = [name for name, token in (("Discord", settings.discord_token), ("Telegram", settings.telegram_token))
                  if token is not None]
    if configured:
        logger.warning("%s token(s) found, but this build has no %s adapter yet; starting the console chat",
                       " and ".join(configured), "/".join(configured))
    return cmd_chat(settings, args)


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


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    print(settings.model_dump_json(indent=2))
    return 0


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    from bot.store import Store

    for table, count in Store(settings.storage.db_path).stats().items():
        print(f"{table:16} {count}")
    return 0


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
    sub.add_parser("config", help="print the effective settings").set_defaults(func=cmd_config)
    sub.add_parser("stats", help="print what the database holds").set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    from bot.model import ModelError
    from bot.store import StoreError
    from persona import PersonaError

    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # undecodable input bytes become U+FFFD instead of a crash
    if args.command in ("persona",) and args.action in ("show", "import") and not args.target:
        print(f"banryeo persona {args.action}: which {'persona' if args.action == 'show' else 'file'}?",
              file=sys.stderr)
        return 2
    try:
        settings = load_settings(args.config)
        return args.func(settings, args)
    except (ConfigError, ModelError, StoreError, PersonaError) as exc:
        print(f"banryeo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
