"""Nothing private in the logs at the default level: no bot tokens, no message texts."""

import logging

from bot.cli import configure_logging
from tests.fake_discord import user as discord_user
from tests.conftest import TELEGRAM_ALICE as ALICE
from tests.conftest import buttons, say, send_and_get_offer

SECRET = "내 비밀번호는 hunter2야"


async def test_telegram_logs_hold_no_token_and_no_message_text(telegram_env, engine, caplog):
    configure_logging()
    caplog.set_level(logging.INFO)
    fake = telegram_env
    message_id, offer = await say(fake, SECRET)
    query = await fake.click(ALICE, message_id, buttons(offer)[0])
    await fake.wait_answered(query["id"])
    fake.blocked_chats.add(42)
    await fake.send(ALICE, SECRET + " 또")  # a failed send is logged: still without the text
    await fake.wait_attempt("sendMessage", after=len(fake.attempts))
    assert engine.store.stats()["picks"] == 1
    logged = caplog.text
    assert logged and fake.token not in logged and "hunter2" not in logged
    assert not any(offer_text in logged for offer_text in [offer["text"][:20]])


async def test_discord_logs_hold_no_token_and_no_message_text(discord_env, caplog):
    configure_logging()
    caplog.set_level(logging.INFO)
    fake, bot = discord_env
    await send_and_get_offer(fake, discord_user(42, "alice"), SECRET)
    assert fake.token not in caplog.text and "hunter2" not in caplog.text
