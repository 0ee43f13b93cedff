"""Chat commands, written once for every platform: each turns a user and its arguments into a Reply.

    commands = Commands(engine, admin)
    reply = await commands.run("persona", user, ["sam"])

A platform only translates: it shows `reply.text` (to the caller alone when `reply.private`), attaches
`reply.file` or `reply.image`, adds its confirmation buttons when `reply.confirm_forget` (and calls
`forget_confirmed` when they are pressed), and sends `await reply.later()` when that is set. Admin
commands are declared once (`ADMIN_COMMANDS`) and checked here against `admins`, whatever a
platform's command menu shows.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from bot.admin import Admin
from bot.engine import DialogueEngine, EngineError, Opening, UserRef
from bot.messages import render, with_hint

DESCRIPTIONS = {  # command: (English, Korean), for the platforms' command menus
    "start": ("Say hello", "인사하기"),
    "persona": ("List or switch personas", "페르소나 목록·바꾸기"),
    "reset": ("Start a new conversation", "새 대화 시작"),
    "regen": ("New candidates for my last message", "후보 다시 뽑기"),
    "learning": ("Learn from my picks: on or off", "내 선택으로 배우기 켜기·끄기"),
    "export": ("My data as a JSON file", "내 데이터 받기"),
    "forget": ("Delete all my data", "내 데이터 지우기"),
    "help": ("How it works", "도움말"),
    "status": ("Admin: generations and schedule", "관리: 세대와 일정"),
    "train": ("Admin: run the nightly training now", "관리: 지금 학습"),
    "rollback": ("Admin: serve the previous generation", "관리: 이전 세대로"),
    "stats": ("Admin: counts and the metrics chart", "관리: 통계와 차트"),
    "pause": ("Admin: pause learning", "관리: 학습 멈추기"),
    "resume": ("Admin: resume learning", "관리: 학습 다시 시작"),
}
USER_COMMANDS = ("start", "help", "reset", "persona", "learning", "export", "forget")
ADMIN_COMMANDS = ("status", "train", "rollback", "stats", "pause", "resume")
# `regen` is not here: it answers with new candidates, like a message (each platform's chat flow)
PUBLIC_COMMANDS = ("start", "reset", "persona")  # their answers continue the chat; all others are private
EXPORT_FILENAME = "banryeo-export.json"
LEARNING_CHOICES = {"on": "on", "off": "off", "켜기": "on", "끄기": "off"}


@dataclass
class Reply:
    """What a command answers."""

    text: str
    private: bool = False                       # only the caller should see it (Discord: ephemeral)
    refused: bool = False                       # a refusal or an error, not the command's result (always private)
    file: tuple[str, bytes] | None = None       # (file name, content) to attach
    image: Path | None = None                   # a picture to attach (the metrics chart)
    confirm_forget: bool = False                # show Delete / Cancel buttons only the caller can press
    later: Callable[[], Awaitable["Reply"]] | None = None  # a second answer once long work is done


class Commands:
    def __init__(self, engine: DialogueEngine, admin: Admin):
        self.engine = engine
        self.admin = admin

    async def run(self, name: str, user: UserRef, args: list[str] | tuple[str, ...] = ()) -> Reply:
        """Run command `name` (one of USER_COMMANDS or ADMIN_COMMANDS) for `user`."""
        language = self.engine.language_of(user)
        if name in ADMIN_COMMANDS and not self.admin.is_admin(user.id):
            return Reply(render("admin_only", language), private=True, refused=True)
        if name not in USER_COMMANDS and name not in ADMIN_COMMANDS:
            return Reply(render("unknown_command", language, command=f"/{name}"), private=True, refused=True)
        try:
            return await getattr(self, f"_{name}")(user, [a for a in args if a], language)
        except EngineError as exc:
            return Reply(render(exc.key, language, **exc.params), private=True, refused=True)

    async def forget_confirmed(self, user: UserRef) -> Reply:
        """The caller pressed Delete on their own confirmation."""
        language = self.engine.language_of(user)
        await self.engine.forget(user)
        return Reply(render("forget_done", language), private=True)

    # -- user commands ---------------------------------------------------------------------------

    async def _start(self, user: UserRef, args: list[str], language: str) -> Reply:
        opening = await self.engine.open(user)
        text = f"{opening.persona_name}: {opening.greeting}" if opening.greeting else render("help_chat", language)
        return Reply(with_hint(text, opening.hint, language))

    async def _help(self, user: UserRef, args: list[str], language: str) -> Reply:
        return Reply(with_hint(render("help_chat", language), self.engine.language_hint(user), language), private=True)

    async def _reset(self, user: UserRef, args: list[str], language: str) -> Reply:
        return self._opened(render("reset_done", language), await self.engine.reset(user), language)

    async def _persona(self, user: UserRef, args: list[str], language: str) -> Reply:
        if not args:
            return Reply(render("persona_list", language, current=self.engine.persona_of(user).key,
                                personas=", ".join(self.engine.persona_keys())))
        opening = await self.engine.set_persona(user, args[0])
        language = self.engine.language_of(user)
        return self._opened(render("persona_changed", language, name=opening.persona_name), opening, language)

    async def _learning(self, user: UserRef, args: list[str], language: str) -> Reply:
        choice = LEARNING_CHOICES.get(args[0].lower()) if args else None
        if choice is not None:
            await self.engine.set_learning(user, choice == "on")
            return Reply(render(f"learning_{choice}", language), private=True)
        key = "learning_status_on" if self.engine.learning_enabled(user) else "learning_status_off"
        return Reply(render(key, language), private=True)

    async def _export(self, user: UserRef, args: list[str], language: str) -> Reply:
        data = json.dumps(await self.engine.export(user), ensure_ascii=False, indent=2).encode()
        return Reply(render("export_ready", language), private=True, file=(EXPORT_FILENAME, data))

    async def _forget(self, user: UserRef, args: list[str], language: str) -> Reply:
        return Reply(render("forget_confirm", language), private=True, confirm_forget=True)

    # -- admin commands (callers are checked in `run`) --------------------------------------------

    async def _status(self, user: UserRef, args: list[str], language: str) -> Reply:
        return Reply(self.admin.status_text(), private=True)

    async def _train(self, user: UserRef, args: list[str], language: str) -> Reply:
        async def result() -> Reply:
            return Reply(await self.admin.train_now_text(language), private=True)

        return Reply(render("training_started", language), private=True, later=result)

    async def _rollback(self, user: UserRef, args: list[str], language: str) -> Reply:
        if not args or len(args) > 2 or (len(args) == 2 and not re.fullmatch(r"[0-9]{1,6}", args[1])):
            return Reply("/rollback LINEAGE [NUMBER], e.g. /rollback telegram:1234", private=True, refused=True)
        try:
            now_serving = self.admin.rollback(args[0], int(args[1]) if len(args) == 2 else None)
        except ValueError as exc:
            return Reply(str(exc), private=True, refused=True)
        return Reply(f"{args[0]} -> {now_serving}", private=True)

    async def _stats(self, user: UserRef, args: list[str], language: str) -> Reply:
        text = "\n".join(f"{k}: {v}" for k, v in self.admin.stats().items())
        lineage = args[0] if args else None
        if not lineage or not self.admin.generations(lineage):
            return Reply(text, private=True)
        path = self.engine.settings.storage.data_dir.expanduser() / "charts" / f"chart-{user.platform}.png"
        await asyncio.to_thread(self.admin.chart, lineage, path)  # drawing takes a moment: off the event loop
        return Reply(text, private=True, image=path)

    async def _pause(self, user: UserRef, args: list[str], language: str) -> Reply:
        self.admin.pause_learning(True)
        return Reply(render("learning_paused", language), private=True)

    async def _resume(self, user: UserRef, args: list[str], language: str) -> Reply:
        self.admin.pause_learning(False)
        return Reply(render("learning_resumed", language), private=True)

    @staticmethod
    def _opened(header: str, opening: Opening, language: str) -> Reply:
        """A confirmation followed by the greeting that opens the new conversation."""
        return Reply(with_hint(f"{header}\n{opening.persona_name}: {opening.greeting}", opening.hint, language))
