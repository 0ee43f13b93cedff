"""Chat with the companion in a terminal: the console adapter.

    banryeo chat

Type a message and the companion offers numbered candidate replies; type a number to pick one,
or just keep talking. /help lists the commands (Korean aliases too: /도움, /다시, /새로, /페르소나, /끝).
"""

from __future__ import annotations

import asyncio
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Callable

from bot.admin import Admin
from bot.commands import Commands, Reply
from bot.engine import Offer, DialogueEngine, EngineError, UserRef
from bot.messages import render

CONSOLE_USER = UserRef("console", "local", "")

COMMANDS = {
    "/help": "help", "/도움": "help", "/?": "help",
    "/regen": "regen", "/다시": "regen",
    "/reset": "reset", "/새로": "reset",
    "/persona": "persona", "/페르소나": "persona",
    "/learning": "learning", "/학습": "learning",
    "/export": "export", "/내보내기": "export",
    "/forget": "forget", "/지우기": "forget",
    "/quit": "quit", "/exit": "quit", "/끝": "quit",
}


class ConsoleChat:
    """One console conversation. `read` returns a line or raises EOFError; `write` prints a block."""

    def __init__(self, engine: DialogueEngine, read: Callable[[str], str] = input,
                 write: Callable[[str], None] = print, user: UserRef = CONSOLE_USER,
                 commands: Commands | None = None):
        self.engine = engine
        self.commands = commands or Commands(engine, Admin(engine.store, engine.settings))
        self.read = read
        self.write = write
        self.user = user
        self.offer: Offer | None = None  # the latest candidates shown

    def say(self, key: str, **params: object) -> None:
        self.write(render(key, self.engine.language_of(self.user), **params))

    async def run(self) -> None:
        opening = await self.engine.open(self.user)
        card = self.engine.persona_of(self.user)
        if opening.greeting:
            self.write(f"{card.name}: {opening.greeting}")
        self.write("(/help · /도움)")
        while True:
            try:
                line = await asyncio.to_thread(self.read, f"{card.user_name()}> ")
            except (EOFError, KeyboardInterrupt):
                self.say("goodbye")
                return
            try:
                if not await self.handle(line):
                    self.say("goodbye")
                    return
            except EngineError as exc:
                self.say(exc.key, **exc.params)
            card = self.engine.persona_of(self.user)

    async def handle(self, line: str) -> bool:
        """Act on one input line; False means the user wants to leave."""
        text = line.strip()
        word, _, rest = text.partition(" ")
        command = COMMANDS.get(word.lower()) if word.startswith("/") else None
        if word.startswith("/") and command is None:
            self.say("unknown_command", command=word)
        elif command == "quit":
            return False
        elif command == "help":
            self.say("help")
        elif command == "regen":
            self.show(await self.engine.regenerate(self.user))
        elif command in ("reset", "persona", "learning"):
            reply = await self.commands.run(command, self.user, rest.split())
            if command != "learning" and not reply.refused and (command == "reset" or rest.strip()):
                self.offer = None  # a new conversation: the shown candidates are gone
            self.write(reply.text)
        elif command == "export":
            await self.export()
        elif command == "forget":
            await self.forget()
        elif re.fullmatch(r"[0-9]{1,2}", text):  # a short number picks; longer ones (or ² and ٣) are just messages
            if self.offer is None or self.offer.auto_picked:
                self.say("nothing_to_pick")
            else:
                await self.pick(int(text))
        else:
            self.show(await self.engine.on_message(self.user, text))
        return True

    async def export(self) -> None:
        """Everything stored about the console user, in ./banryeo-export-<time>.json (readable by you only)."""
        reply: Reply = await self.commands.run("export", self.user)
        _, data = reply.file
        path = Path(f"banryeo-export-{datetime.now():%Y%m%d-%H%M%S}.json").resolve()
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
            handle.write(data)
        self.say("export_saved", path=str(path))

    async def forget(self) -> None:
        """Delete everything about the console user, after a typed confirmation."""
        self.say("forget_confirm")
        self.say("forget_type_yes")
        try:
            answer = await asyncio.to_thread(self.read, "> ")
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer.strip().lower() in ("yes", "y", "네", "응"):
            self.write((await self.commands.forget_confirmed(self.user)).text)
            self.offer = None
        else:
            self.say("forget_cancelled")

    async def pick(self, number: int) -> None:
        picked = await self.engine.on_pick(self.user, self.offer.id, number - 1)
        if picked.already:
            self.say("pick_already", index=number)
        else:
            self.write(f"{picked.persona_name}: {picked.text}")

    def show(self, offer: Offer) -> None:
        self.offer = offer
        if offer.opening:
            self.write(f"{offer.persona_name}: {offer.opening}")
        for notice in offer.notices:
            self.write(render(notice.key, offer.language, **notice.params))
        if offer.auto_picked:
            self.write(f"{offer.persona_name}: {offer.texts[0]}")
            return
        self.write("\n".join(f"  {i}) {text}" for i, text in enumerate(offer.texts, start=1)))
        self.write(render("choose", offer.language, count=len(offer.texts)))
