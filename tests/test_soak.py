"""Soak: many users on both platforms at once while a training run and a promotion happen.

Bounded in users, messages and time, loopback only. Every message must get either a reply with
candidates or a clear refusal ("busy", "slow down"); every acknowledged pick must be stored once; no
user may ever see an offer that belongs to someone else.
"""

import asyncio
import json
import time

import discord
import pytest

from bot.admin import Admin
from bot.discord_bot import PICK_EMOJIS, create_discord_bot
from bot.messages import MESSAGES
from bot.telegram_bot import TelegramCompanion, build_application, run_telegram
from tests.fake_discord import FakeDiscord
from tests.fake_discord import user as discord_user
from tests.fake_telegram import FakeTelegram
from tests.fake_telegram import user as telegram_user
from tests.conftest import LENIENT, configure
from training.rollover import run_rollover

USERS_PER_PLATFORM, MESSAGES_PER_USER = 6, 3
REFUSALS = [text.split("{")[0] for key in ("busy", "slow_down") for text in MESSAGES[key].values()]


def refusal(text: str) -> bool:
    return any(text.startswith(prefix) for prefix in REFUSALS)


async def until(condition, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return result


@pytest.mark.timeout(600)
async def test_soak_both_platforms_with_training_and_promotion(engine, settings):
    configure(settings, LENIENT)
    settings.training.lineage = "shared"
    settings.training.min_new_picks = 6
    settings.sampling.max_new_tokens = 6
    settings.serving.max_queue = 8       # small, so that some messages meet a full queue
    settings.chat.messages_per_minute = 2  # the third message of each user comes too fast
    settings.admins = []
    telegram, discord_fake = FakeTelegram(), FakeDiscord()
    await telegram.start()
    await discord_fake.start()
    original = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    settings.telegram.api_base, settings.telegram.poll_timeout = telegram.base_url, 1
    settings.discord.api_base, settings.discord.gateway_url = discord_fake.api_base, discord_fake.gateway_url
    admin = Admin(engine.store, settings)
    companion = TelegramCompanion(engine, admin, settings)
    telegram_task = asyncio.create_task(run_telegram(build_application(companion, telegram.token), companion,
                                                     settings))
    bot = create_discord_bot(engine, admin, settings, guild_ready_timeout=0)
    await bot.login(discord_fake.token)
    discord_task = asyncio.create_task(bot.connect(reconnect=True))
    await asyncio.wait_for(bot.wait_until_ready(), 30)
    await telegram.wait_attempt("getUpdates", timeout=30)

    sent = offers = refusals = picks_acknowledged = 0
    crossed: list[str] = []

    async def telegram_user_chats(i: int) -> None:
        nonlocal sent, offers, refusals, picks_acknowledged
        person = telegram_user(1000 + i, f"t{i}")
        for n in range(MESSAGES_PER_USER):
            at = len(telegram.calls)
            await telegram.send(person, f"텔레그램 {i}번의 {n}번째 메시지")
            sent += 1
            reply = await until(lambda: next((p for m, p in telegram.calls[at:] if m == "sendMessage"
                                              and p["chat_id"] == person["id"]
                                              and (refusal(p["text"]) or "pick:" in json.dumps(p.get("reply_markup"))
                                                   or "thumb:" in json.dumps(p.get("reply_markup")))), None))
            if refusal(reply["text"]):
                refusals += 1
                continue
            offers += 1
            message = next(m for m in reversed(list(telegram.messages.values()))
                           if m["chat"]["id"] == person["id"] and m.get("text") == reply["text"])
            set_id = await until(lambda: engine.store.set_for_message("telegram",
                                                                      f"{person['id']}:{message['message_id']}"))
            if engine.store.candidate_set(set_id)["user_id"] != f"telegram:{person['id']}":
                crossed.append(set_id)
            data = [b["callback_data"] for row in message["reply_markup"]["inline_keyboard"] for b in row]
            if data[0].startswith("pick:"):
                query = await telegram.click(person, message["message_id"], data[0])
                answer = await telegram.wait_answered(query["id"])
                if not answer.get("show_alert"):
                    picks_acknowledged += 1

    async def discord_user_chats(i: int) -> None:
        nonlocal sent, offers, refusals, picks_acknowledged
        person, channel = discord_user(2000 + i, f"d{i}"), str(700 + i)
        for n in range(MESSAGES_PER_USER):
            at = len(discord_fake.calls)
            await discord_fake.dm(person, f"디스코드 {i}번의 {n}번째 메시지", channel=channel)
            sent += 1
            def answer():  # the first post in this DM that is a refusal or an offer (the greeting is neither)
                for method, path, body in discord_fake.calls[at:]:
                    if method != "POST" or path != f"/api/v10/channels/{channel}/messages":
                        continue
                    if refusal(body["content"]):
                        return body, None
                    message_id = next((mid for mid, m in discord_fake.messages.items()
                                       if m["channel_id"] == channel and m["content"] == body["content"]), None)
                    set_id = message_id and engine.store.set_for_message("discord", message_id)
                    if set_id:
                        return body, (message_id, set_id)
                return None

            body, linked = await until(answer)
            if linked is None:
                refusals += 1
                continue
            offers += 1
            message_id, set_id = linked
            if engine.store.candidate_set(set_id)["user_id"] != f"discord:{person['id']}":
                crossed.append(set_id)
            if "1️⃣" in body["content"]:
                edits = discord_fake.count("PATCH", f"/messages/{message_id}")
                await discord_fake.react(person["id"], message_id, PICK_EMOJIS[0], channel=channel)
                await until(lambda: discord_fake.count("PATCH", f"/messages/{message_id}") > edits)
                picks_acknowledged += 1

    async def train_and_promote() -> None:
        await until(lambda: engine.store.stats()["picks"] >= 6)
        [outcome] = await asyncio.to_thread(run_rollover, settings)
        assert outcome.status == "promoted", outcome

    try:
        await asyncio.wait_for(asyncio.gather(
            train_and_promote(),
            *(telegram_user_chats(i) for i in range(USERS_PER_PLATFORM)),
            *(discord_user_chats(i) for i in range(USERS_PER_PLATFORM))), 540)
        # after the promotion, newcomers on both platforms are answered by the new generation
        await asyncio.wait_for(asyncio.gather(telegram_user_chats(USERS_PER_PLATFORM),
                                              discord_user_chats(USERS_PER_PLATFORM)), 120)
    finally:
        telegram_task.cancel()
        await asyncio.gather(telegram_task, return_exceptions=True)
        await bot.close()
        await asyncio.gather(discord_task, return_exceptions=True)
        await telegram.stop()
        await discord_fake.stop()
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = original

    store = engine.store
    assert sent == 2 * (USERS_PER_PLATFORM + 1) * MESSAGES_PER_USER == offers + refusals
    assert refusals >= 1 and offers >= sent // 3  # clear refusals under pressure (and for the too-fast third messages)
    manual_picks = store.db.execute("SELECT count(*) FROM picks WHERE auto = 0").fetchone()[0]
    assert manual_picks == picks_acknowledged  # zero lost picks, none stored twice
    assert crossed == []                       # zero cross-user replies
    generations = {row["generation"] for row in store.db.query("SELECT generation FROM candidate_sets")}
    assert "user-shared-gen-1" in generations  # replies after the promotion came from the new generation
    print(f"soak: {sent} messages, {offers} offers, {refusals} refusals, {manual_picks} picks, "
          f"generations {sorted(generations)}")
