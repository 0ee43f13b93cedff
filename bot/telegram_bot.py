"""Telegram: chat in private chats, pick replies with inline buttons, admin commands.

    companion = TelegramCompanion(engine, admin, settings)
    application = build_application(companion, token)
    await run_telegram(application, companion, settings)   # until cancelled

A message gets "typing…" while candidates are sampled, then one message with the numbered candidates
and an inline keyboard: one button per candidate and 🔄 (regenerate). A press answers the callback,
edits the message down to the picked reply (with 👍/👎 buttons to rate it) and stores the pick. A new
message without a pick skips the offer, as on Discord: a late press on it is answered "from earlier".

Button data is `pick:<set>:<index>`, `regen:<set>`, `thumb:<set>:up|down` or `forget:<user>:yes|no`.
It only names things; the engine checks every press against the stored set (owner, status, index),
so a forwarded, replayed or forged button changes nothing and gets a clear answer.

Updates are processed concurrently (one user's sampling never holds up another user); the engine
serialises each user's own requests. Polling by default; `telegram.mode = "webhook"` serves a webhook.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

from telegram import (BotCommand, BotCommandScopeChat, Chat, InlineKeyboardButton, InlineKeyboardMarkup, InputFile,
                      Message, Update)
from telegram import User as TelegramUser
from telegram.constants import ChatAction, ChatType, MessageLimit
from telegram.error import BadRequest, Forbidden, InvalidToken, TelegramError
from telegram.ext import (AIORateLimiter, Application, ApplicationBuilder, CallbackQueryHandler, CommandHandler,
                          ContextTypes, MessageHandler, filters)

from bot.admin import Admin
from bot.commands import ADMIN_COMMANDS, DESCRIPTIONS, USER_COMMANDS, Commands, Reply
from bot.config import ConfigError, Settings
from bot.engine import Offer, DialogueEngine, EngineError, UserRef
from bot.messages import NUMBERS, numbered_offer, render
from bot.messages import fit as fit_within

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
MESSAGE_LIMIT = MessageLimit.MAX_TEXT_LENGTH  # 4,096 characters
TYPING_EVERY = 4.0  # seconds; Telegram shows "typing…" for about five

MENU = ("start", "persona", "reset", "regen", "learning", "export", "forget", "help")  # setMyCommands order
PRIVATE_ONLY = ("export", "forget")  # never in a group, where others would see the file or the buttons


def user_ref(user: TelegramUser, chat: Chat | None = None) -> UserRef:
    """The engine's user; in a group, with the group's id so it gets its own conversation (never the DM's)."""
    in_group = chat is not None and chat.type != ChatType.PRIVATE
    return UserRef(PLATFORM, str(user.id), user.full_name, str(chat.id) if in_group else "",
                   locale=user.language_code or "")


def fit(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return fit_within(text, limit)


# -- button data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Button:
    action: str        # pick, regen, thumb, forget
    target: str        # a candidate set id, or a user id for forget
    value: str = ""    # candidate index, up/down, yes/no


SET_ID = re.compile(r"[0-9a-f]{1,32}")


def parse_button(data: str | None) -> Button | None:
    """The button a callback names, or None when the data is not one of ours or malformed."""
    action, _, rest = (data or "").partition(":")
    if action == "regen":
        return Button("regen", rest) if SET_ID.fullmatch(rest) else None
    target, _, value = rest.rpartition(":")
    if action == "pick" and SET_ID.fullmatch(target) and re.fullmatch(r"[0-9]{1,2}", value):  # not ² or ٣
        return Button("pick", target, value)
    if action == "thumb" and SET_ID.fullmatch(target) and value in ("up", "down"):
        return Button("thumb", target, value)
    if action == "forget" and target and value in ("yes", "no"):
        return Button("forget", target, value)
    return None


def offer_keyboard(offer: Offer) -> InlineKeyboardMarkup:
    picks = [InlineKeyboardButton(NUMBERS[i], callback_data=f"pick:{offer.id}:{i}") for i in range(len(offer.texts))]
    return InlineKeyboardMarkup([[*picks, InlineKeyboardButton("🔄", callback_data=f"regen:{offer.id}")]])


def thumbs_keyboard(set_id: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("👍", callback_data=f"thumb:{set_id}:up"),
                                  InlineKeyboardButton("👎", callback_data=f"thumb:{set_id}:down")]])


def offer_text(offer: Offer, language: str, notices: list[str]) -> str:
    """Numbered candidates in one message within Telegram's 4,096 characters."""
    return numbered_offer(offer.texts, notices, language, MESSAGE_LIMIT, gap="\n\n")


# -- the handlers ---------------------------------------------------------------------------------

class TelegramCompanion:
    """Thin handlers: read the update, call the engine, answer in the user's language."""

    def __init__(self, engine: DialogueEngine, admin: Admin, settings: Settings):
        self.engine = engine
        self.commands = Commands(engine, admin)
        self.settings = settings

    # which updates are ours

    def addressed(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> bool:
        """Private chats always; groups only when enabled and the bot is mentioned, replied to, or commanded."""
        chat, message = update.effective_chat, update.effective_message
        if chat is None or message is None or update.effective_user is None:
            return False
        if chat.type == ChatType.PRIVATE:
            return True
        if not self.settings.telegram.answer_in_groups:
            return False
        text = message.text or message.caption or ""
        replied = message.reply_to_message
        return (f"@{context.bot.username}".lower() in text.lower() or text.startswith("/")
                or (replied is not None and replied.from_user is not None and replied.from_user.id == context.bot.id))

    def language(self, user: UserRef) -> str:
        return self.engine.language_of(user)

    # chat

    async def on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if not self.addressed(update, context):
            return
        user = user_ref(update.effective_user, update.effective_chat)
        text = update.effective_message.text.replace(f"@{context.bot.username}", "").strip()
        await self.answer_with_offer(update, context, user, self.engine.on_message(user, text))

    async def answer_with_offer(self, update: Update, context: ContextTypes.DEFAULT_TYPE, user: UserRef,
                                request) -> None:
        """Show "typing…" while the engine samples, then the offer (or the engine's clear answer)."""
        chat_id = update.effective_chat.id
        try:
            async with typing(context, chat_id):
                offer = await request
        except EngineError as exc:
            await update.effective_message.reply_text(render(exc.key, self.language(user), **exc.params))
            return
        await self.send_offer(context, chat_id, user, offer)

    async def send_offer(self, context: ContextTypes.DEFAULT_TYPE, chat_id: int, user: UserRef,
                         offer: Offer) -> None:
        language, name = offer.language, offer.persona_name
        if offer.opening:
            await context.bot.send_message(chat_id, fit(f"{name}: {offer.opening}"))
        notices = [render(n.key, language, **n.params) for n in offer.notices]
        if offer.auto_picked:  # one distinct reply: nothing to choose, but it can be rated
            text = fit("\n".join([*notices, f"{name}: {offer.texts[0]}"]))
            sent = await context.bot.send_message(chat_id, text, reply_markup=thumbs_keyboard(offer.id))
        else:
            sent = await context.bot.send_message(chat_id, offer_text(offer, language, notices),
                                                  reply_markup=offer_keyboard(offer))
        self.engine.link_message(PLATFORM, f"{chat_id}:{sent.message_id}", offer.id)

    async def on_non_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if self.addressed(update, context) and update.effective_chat.type == ChatType.PRIVATE:
            await update.effective_message.reply_text(render("text_only", self.language(user_ref(update.effective_user, update.effective_chat))))

    async def on_edited(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if self.addressed(update, context) and update.effective_chat.type == ChatType.PRIVATE:
            await update.effective_message.reply_text(render("edited_ignored",
                                                             self.language(user_ref(update.effective_user, update.effective_chat))))

    # buttons

    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        user = user_ref(query.from_user, query.message.chat if query.message else None)
        language = self.language(user)
        button = parse_button(query.data)
        if button is None:
            await query.answer(render("button_unknown", language), show_alert=True)
            return
        if button.action == "forget":
            await self.on_forget_button(query, user, button, language)
            return
        if button.action == "thumb":
            rated = await self.engine.on_thumb(user, button.target, 1 if button.value == "up" else -1)
            await query.answer(render("thumb_saved" if rated else "pick_unknown", language), show_alert=not rated)
            return
        if button.action == "regen":
            await self.on_regenerate(query, context, user, button.target, language)
            return
        index = int(button.value)
        try:
            picked = await self.engine.on_pick(user, button.target, index)
        except EngineError as exc:
            await query.answer(render(exc.key, language, **exc.params), show_alert=True)
            return
        await query.answer(render("picked", language, number=index + 1))
        if picked.already:
            return  # a double press: the message already shows this pick
        text = fit(f"{picked.persona_name}: {picked.text}\n\n{render('picked', language, number=index + 1)}")
        await edit_text(query.message, text, thumbs_keyboard(button.target))

    async def on_regenerate(self, query, context: ContextTypes.DEFAULT_TYPE, user: UserRef, set_id: str,
                            language: str) -> None:
        try:
            self.engine.check_open(user, set_id)  # a plainly stale or foreign 🔄 gets the button's own alert
        except EngineError as exc:
            await query.answer(render(exc.key, language, **exc.params), show_alert=True)
            return
        await query.answer()  # stop the button's spinner; sampling takes a few seconds
        chat_id = query.message.chat.id if query.message else int(user.platform_id)
        try:
            async with typing(context, chat_id):
                offer = await self.engine.regenerate(user, set_id)
        except EngineError as exc:
            await context.bot.send_message(chat_id, render(exc.key, language, **exc.params))
            return
        if query.message is not None:
            await edit_markup(query.message, None)  # the replaced candidates can no longer be picked
        await self.send_offer(context, chat_id, user, offer)

    async def on_forget_button(self, query, user: UserRef, button: Button, language: str) -> None:
        if button.target != user.id:  # a confirmation forwarded to someone else
            await query.answer(render("not_yours", language), show_alert=True)
            return
        await query.answer()
        if button.value == "yes":
            await edit_text(query.message, (await self.commands.forget_confirmed(user)).text, None)
        else:
            await edit_text(query.message, render("forget_cancelled", language), None)

    # commands (bot/commands.py decides; this only shows the reply)

    async def on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/start, /help, /reset, /persona, /learning, /export, /forget and the admin commands."""
        if not self.addressed(update, context):
            return
        user = user_ref(update.effective_user, update.effective_chat)
        name = update.effective_message.text.split()[0][1:].split("@")[0].lower()
        if name in PRIVATE_ONLY and update.effective_chat.type != ChatType.PRIVATE:
            await update.effective_message.reply_text(render("private_only", self.language(user)))
            return
        await self.show(update.effective_message, user, await self.commands.run(name, user, context.args or []))

    async def show(self, message: Message, user: UserRef, reply: Reply) -> None:
        if reply.file is not None:
            name, data = reply.file
            await message.reply_document(InputFile(io.BytesIO(data), filename=name), caption=reply.text)
        elif reply.image is not None:
            with reply.image.open("rb") as photo:
                await message.reply_photo(photo, caption=fit(reply.text, MessageLimit.CAPTION_LENGTH))
        elif reply.confirm_forget:
            keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("삭제 / Delete", callback_data=f"forget:{user.id}:yes"),
                                              InlineKeyboardButton("취소 / Cancel", callback_data=f"forget:{user.id}:no")]])
            await message.reply_text(reply.text, reply_markup=keyboard)
        else:
            await message.reply_text(fit(reply.text))
        if reply.later is not None:
            await self.show(message, user, await reply.later())

    async def cmd_regen(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if not self.addressed(update, context):
            return
        user = user_ref(update.effective_user, update.effective_chat)
        await self.answer_with_offer(update, context, user, self.engine.regenerate(user))

    async def on_unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if self.addressed(update, context) and update.effective_chat.type == ChatType.PRIVATE:
            command = (update.effective_message.text or "").split()[0]
            await update.effective_message.reply_text(render("unknown_command",
                                                             self.language(user_ref(update.effective_user, update.effective_chat)),
                                                             command=command))

    # errors and the command menu

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        # Everything the user sent is already stored by the engine; a failed send is logged, not retried.
        if isinstance(context.error, Forbidden):
            logger.info("a Telegram user blocked the bot; their messages stay stored (%s)", context.error)
        else:
            logger.error("Telegram update failed", exc_info=context.error)

    async def register_commands(self, application: Application) -> None:
        """The command menu: English by default, Korean for Korean clients, admin commands for admins."""
        bot = application.bot
        await bot.set_my_commands([BotCommand(c, DESCRIPTIONS[c][0]) for c in MENU])
        await bot.set_my_commands([BotCommand(c, DESCRIPTIONS[c][1]) for c in MENU], language_code="ko")
        admin_menu = [BotCommand(c, DESCRIPTIONS[c][0]) for c in (*MENU, *ADMIN_COMMANDS)]
        for admin_id in self.settings.admins:
            platform, _, chat_id = admin_id.partition(":")
            if platform == PLATFORM and chat_id.lstrip("-").isdigit():
                try:
                    await bot.set_my_commands(admin_menu, scope=BotCommandScopeChat(int(chat_id)))
                except TelegramError as exc:  # an admin who never opened the chat: "chat not found"
                    logger.warning("no admin command menu for %s: %s", admin_id, exc)


# -- small helpers --------------------------------------------------------------------------------

@asynccontextmanager
async def typing(context: ContextTypes.DEFAULT_TYPE, chat_id: int):
    """Keep "typing…" showing while the block runs (the first one is sent before the block starts,
    so even a reply that is ready at once never arrives before its own "typing…")."""
    async def show_typing() -> None:
        try:
            await context.bot.send_chat_action(chat_id, ChatAction.TYPING)
        except TelegramError as exc:
            logger.debug("typing indicator failed: %s", exc)

    async def keep_typing() -> None:
        while True:
            await asyncio.sleep(TYPING_EVERY)
            await show_typing()

    await show_typing()
    task = asyncio.create_task(keep_typing())
    try:
        yield
    finally:
        task.cancel()


async def edit_text(message: Message | None, text: str, markup: InlineKeyboardMarkup | None) -> None:
    """Edit a message if Telegram still lets us (messages older than 48 hours cannot be edited)."""
    if message is None or not isinstance(message, Message):
        return
    try:
        await message.edit_text(text, reply_markup=markup)
    except BadRequest as exc:
        logger.info("could not edit message %s: %s", message.message_id, exc)


async def edit_markup(message: Message, markup: InlineKeyboardMarkup | None) -> None:
    if not isinstance(message, Message):
        return
    try:
        await message.edit_reply_markup(markup)
    except BadRequest as exc:
        logger.info("could not edit the buttons of message %s: %s", message.message_id, exc)


# -- wiring ---------------------------------------------------------------------------------------

def build_application(companion: TelegramCompanion, token: str) -> Application:
    """The python-telegram-bot Application with every handler; `telegram.api_base` points it at a test server."""
    builder = (ApplicationBuilder().token(token).concurrent_updates(True)
               .rate_limiter(AIORateLimiter(max_retries=3)))  # waits out 429 retry_after, then retries
    if companion.settings.telegram.api_base:
        base = companion.settings.telegram.api_base
        builder = builder.base_url(base).base_file_url(base.removesuffix("/bot") + "/file/bot")
    application = builder.build()
    c = companion
    application.add_handler(CommandHandler([*USER_COMMANDS, *ADMIN_COMMANDS], c.on_command,
                                           filters=filters.UpdateType.MESSAGE))
    application.add_handler(CommandHandler("regen", c.cmd_regen, filters=filters.UpdateType.MESSAGE))
    application.add_handler(MessageHandler(filters.UpdateType.EDITED, c.on_edited))
    application.add_handler(MessageHandler(filters.COMMAND, c.on_unknown_command))
    application.add_handler(MessageHandler(filters.TEXT, c.on_text))
    application.add_handler(MessageHandler(~filters.TEXT & ~filters.StatusUpdate.ALL, c.on_non_text))
    application.add_handler(CallbackQueryHandler(c.on_button))
    application.add_error_handler(c.on_error)
    return application


async def run_telegram(application: Application, companion: TelegramCompanion, settings: Settings) -> None:
    """Run until cancelled: polling (default) or a webhook server."""
    telegram = settings.telegram
    if telegram.mode == "webhook" and not telegram.webhook_url:
        raise ConfigError("telegram.mode = 'webhook' needs telegram.webhook_url (the public HTTPS URL)")
    try:
        await application.initialize()
    except InvalidToken as exc:
        raise ConfigError(f"Telegram refused TELEGRAM_TOKEN: {exc}") from None
    async with application:
        await companion.register_commands(application)
        await application.start()
        if telegram.mode == "webhook":  # the webhook server serves the path of the public URL
            await application.updater.start_webhook(
                listen=telegram.webhook_listen, port=telegram.webhook_port,
                url_path=urlparse(telegram.webhook_url).path.strip("/"),
                webhook_url=telegram.webhook_url, secret_token=secrets.token_urlsafe(32),
                allowed_updates=Update.ALL_TYPES)
        else:
            await application.updater.start_polling(timeout=telegram.poll_timeout, allowed_updates=Update.ALL_TYPES)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await application.updater.stop()
            await application.stop()
