"""The real python-telegram-bot Application against the local fake Bot API server (tests/fake_telegram.py).

The handlers here are trivial on purpose: these tests check the fake's wire protocol (long polling,
form/multipart decoding, status-to-exception mapping), not the bot.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from telegram import (Bot, BotCommand, BotCommandScopeAllPrivateChats, InlineKeyboardButton,
                      InlineKeyboardMarkup, Update)
from telegram.error import BadRequest, EndPointNotFound, Forbidden, InvalidToken, RetryAfter
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes, MessageHandler, filters

from tests.fake_telegram import BOT_USER, FakeTelegram, group, private_chat, user

pytestmark = pytest.mark.timeout(20)

ALICE = user(42, "Alice", language_code="ko")


async def echo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.message.reply_text(update.message.text)


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.message.reply_text("args: " + " ".join(context.args))


async def menu(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("One", callback_data="pick:1"),
                                      InlineKeyboardButton("Two", callback_data="pick:2")]])
    await update.message.reply_text("Pick one", reply_markup=keyboard)


async def picked(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    await query.answer("ok")
    await query.edit_message_text(f"You picked {query.data.split(':')[1]}")


async def media(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    message = update.message
    kind = next(k for k in ("photo", "sticker", "voice", "document") if getattr(message, k))
    await message.reply_text(f"got {kind}" + (f": {message.caption}" if message.caption else ""))


@pytest.fixture
async def telegram_env():
    """A started fake and a polling Application; yields (fake, app, errors seen by the error handler)."""
    fake = FakeTelegram()
    await fake.start()
    app = Application.builder().token(fake.token).base_url(fake.base_url).base_file_url(fake.base_file_url).build()
    app.add_handler(CommandHandler("start", start))
    app.add_handler(CommandHandler("menu", menu))
    app.add_handler(CallbackQueryHandler(picked, pattern=r"^pick:"))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, echo))
    app.add_handler(MessageHandler(filters.PHOTO | filters.Sticker.ALL | filters.VOICE | filters.Document.ALL, media))
    errors: list[Exception] = []

    async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        errors.append(context.error)

    app.add_error_handler(on_error)
    async with app:
        await app.start()
        await app.updater.start_polling(poll_interval=0, timeout=1, allowed_updates=Update.ALL_TYPES)
        yield fake, app, errors
        await app.updater.stop()
        await app.stop()
    await fake.stop()


async def wait_error(errors: list[Exception], fake: FakeTelegram, method: str) -> Exception:
    """The first error the error handler saw, after the failing `method` call."""
    await fake.wait_attempt(method, timeout=5)
    for _ in range(500):
        if errors:
            return errors[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the error handler saw nothing")


async def test_polling_delivers_a_message_and_the_echo_arrives(telegram_env):
    fake, app, errors = telegram_env
    assert app.bot.username == BOT_USER["username"]
    assert fake.count("getMe") == 1 and fake.count("deleteWebhook") == 1
    message = await fake.send(ALICE, "123")  # a numeric text must stay a string on the wire
    _, params = await fake.wait_for("sendMessage", timeout=5)
    assert params["chat_id"] == ALICE["id"] and params["text"] == "123"
    sent = next(iter(fake.messages.values()))
    assert sent["from"] == BOT_USER and sent["chat"] == private_chat(ALICE) and sent["text"] == "123"
    assert sent["date"] > 0 and sent["message_id"] != message["message_id"]
    _, polled = await fake.wait_for("getUpdates", timeout=5)
    assert polled["allowed_updates"] == list(Update.ALL_TYPES) and polled["timeout"] == 1
    for _ in range(500):  # the next getUpdates confirms the update through its offset
        if not fake.updates:
            break
        await asyncio.sleep(0.01)
    assert not fake.updates
    assert errors == []


async def test_command_with_bot_username_in_a_group(telegram_env):
    fake, app, errors = telegram_env
    chat = group(1001, "Friends")
    message = await fake.send(ALICE, "/start@banryeo_bot now please", chat=chat)
    assert message["entities"] == [{"type": "bot_command", "offset": 0, "length": len("/start@banryeo_bot")}]
    _, params = await fake.wait_for("sendMessage", timeout=5)
    assert params["chat_id"] == -1001 and params["text"] == "args: now please"
    assert fake.messages[max(fake.messages)]["chat"] == chat
    assert errors == []


async def test_click_is_answered_and_the_edit_lands(telegram_env):
    fake, app, errors = telegram_env
    await fake.send(ALICE, "/menu")
    _, params = await fake.wait_for("sendMessage", timeout=5)
    assert params["reply_markup"]["inline_keyboard"][0][1]["callback_data"] == "pick:2"
    message_id = max(fake.messages)
    with pytest.raises(ValueError):
        await fake.click(ALICE, message_id, "pick:3")  # no such button on the message

    query = await fake.click(ALICE, message_id, "pick:2")
    answer = await fake.wait_answered(query["id"], timeout=5)
    assert answer["text"] == "ok"
    _, edit = await fake.wait_for("editMessageText", timeout=5)
    assert edit["message_id"] == message_id and edit["chat_id"] == ALICE["id"]
    edited = fake.messages[message_id]
    assert edited["text"] == "You picked 2" and "reply_markup" not in edited  # no markup given: keyboard gone

    with pytest.raises(BadRequest, match="Message is not modified"):
        await app.bot.edit_message_text("You picked 2", chat_id=ALICE["id"], message_id=message_id)
    with pytest.raises(BadRequest, match="Message to edit not found"):
        await app.bot.edit_message_text("x", chat_id=ALICE["id"], message_id=99999)
    assert errors == []


async def test_blocked_chat_raises_forbidden_in_the_handler(telegram_env):
    fake, app, errors = telegram_env
    fake.blocked_chats.add(ALICE["id"])
    await fake.send(ALICE, "hello?")
    error = await wait_error(errors, fake, "sendMessage")
    assert isinstance(error, Forbidden) and "bot was blocked by the user" in error.message
    assert fake.count("sendMessage") == 0
    assert [status for method, _, status in fake.attempts if method == "sendMessage"] == [403]


async def test_rate_limit_maps_to_retry_after(telegram_env):
    fake, app, errors = telegram_env
    fake.rate_limit_next["sendMessage"] = 1
    await fake.send(ALICE, "first")
    error = await wait_error(errors, fake, "sendMessage")
    assert isinstance(error, RetryAfter) and error.retry_after in (1, timedelta(seconds=1))
    await fake.send(ALICE, "second")  # service is back to normal
    _, params = await fake.wait_for("sendMessage", timeout=5)
    assert params["text"] == "second"


async def test_multipart_send_document_is_decoded(telegram_env):
    fake, app, errors = telegram_env
    sent = await app.bot.send_document(ALICE["id"], document=b"line one\n", filename="notes.txt",
                                       caption="42", thumbnail=b"\x89PNG thumb", disable_notification=True)
    _, params = await fake.wait_for("sendDocument", timeout=5)
    assert params["document"]["filename"] == "notes.txt" and params["document"]["content"] == b"line one\n"
    assert params["thumbnail"]["content"] == b"\x89PNG thumb"  # sent as attach://<part name>
    assert params["caption"] == "42" and params["chat_id"] == 42 and params["disable_notification"] is True
    assert sent.document.file_name == "notes.txt" and sent.caption == "42"
    assert fake.messages[sent.message_id]["document"]["file_size"] == len(b"line one\n")

    file = await app.bot.get_file(sent.document.file_id)
    assert bytes(await file.download_as_bytearray()) == b"line one\n"
    photo = await app.bot.send_photo(ALICE["id"], photo=sent.document.file_id)  # a known file_id, no upload
    assert photo.photo[-1].file_id == sent.document.file_id


async def test_set_my_commands_is_stored_per_scope_and_language(telegram_env):
    fake, app, errors = telegram_env
    await app.bot.set_my_commands([BotCommand("start", "Start"), BotCommand("menu", "Menu")])
    await app.bot.set_my_commands([BotCommand("start", "시작")], scope=BotCommandScopeAllPrivateChats(),
                                  language_code="ko")
    assert [c["command"] for c in fake.commands_for()] == ["start", "menu"]
    assert fake.commands_for("all_private_chats", "ko") == [{"command": "start", "description": "시작"}]
    assert fake.commands_for("all_private_chats") == []
    commands = await app.bot.get_my_commands(scope=BotCommandScopeAllPrivateChats(), language_code="ko")
    assert [(c.command, c.description) for c in commands] == [("start", "시작")]
    with pytest.raises(BadRequest, match="(?i)bot_command_invalid"):
        await app.bot.set_my_commands([BotCommand("Start", "upper case is not allowed")])
    await app.bot.delete_my_commands()
    assert fake.commands_for() == []


@pytest.mark.parametrize("kind", ["photo", "sticker", "voice", "document"])
async def test_user_media_parses_in_ptb(telegram_env, kind):
    fake, app, errors = telegram_env
    await fake.send_media(ALICE, kind, caption="look" if kind in ("photo", "document") else None)
    _, params = await fake.wait_for("sendMessage", timeout=5)
    assert params["text"].startswith(f"got {kind}")
    assert errors == []


async def test_edited_message_update():
    fake = FakeTelegram()
    await fake.start()
    try:
        bot = Bot(fake.token, base_url=fake.base_url, base_file_url=fake.base_file_url)
        async with bot:
            original = await fake.send(ALICE, "typo")
            await fake.send_edited(ALICE, original["message_id"], "fixed")
            updates = await bot.get_updates(timeout=0)
            assert [u.update_id for u in updates] == [1, 2]
            assert updates[1].edited_message.text == "fixed"
            assert updates[1].edited_message.message_id == original["message_id"]
            assert await bot.get_updates(offset=3, timeout=0) == ()
    finally:
        await fake.stop()


async def test_wrong_token_and_unknown_method():
    fake = FakeTelegram()
    await fake.start()
    try:
        with pytest.raises(InvalidToken):
            async with Bot("999:WRONG", base_url=fake.base_url):
                pass
        async with Bot(fake.token, base_url=fake.base_url) as bot:
            with pytest.raises(EndPointNotFound):  # a 404 once getMe has worked; InvalidToken before
                await bot.do_api_request("noSuchMethod")
        assert [(m, s) for m, _, s in fake.attempts] == [("getMe", 401), ("getMe", 200), ("noSuchMethod", 404)]
    finally:
        await fake.stop()
