"""The real python-telegram-bot Application against a local fake Bot API server on 127.0.0.1."""

import asyncio
import copy
import json
import os
import socket
import sys
from pathlib import Path

import aiohttp

import pytest

from bot.admin import Admin
from bot.engine import Offer, Notice, UserRef
from bot.telegram_bot import (MESSAGE_LIMIT, TelegramCompanion, build_application, offer_text, parse_button,
                              run_telegram)
from tests.fake_discord import FakeDiscord
from tests.fake_discord import user as discord_user
from tests.conftest import answer_to, buttons, next_offer, say, sent_after
from tests.fake_telegram import BOT_USER, FakeTelegram, group, user

ALICE = user(42, "Alice")
MALLORY = user(66, "Mallory")
ADMIN = user(7, "Admin")


async def test_start_message_pick_and_edit(telegram_env, engine):
    fake = telegram_env
    assert [c["command"] for c in fake.commands_for()][:2] == ["start", "persona"]
    assert fake.commands_for(language_code="ko")[0]["description"] == "인사하기"
    assert "status" in [c["command"] for c in fake.commands_for("chat", chat_id=7)]
    assert "status" not in [c["command"] for c in fake.commands_for()]

    at = len(fake.calls)
    await fake.send(ALICE, "/start")
    _, greeting = await fake.wait_for("sendMessage", after=at)
    assert greeting["text"].startswith("하루:")

    at = len(fake.calls)
    message_id, offer = await say(fake, "안녕! 오늘 피곤했어")
    typing_at, action = await fake.wait_for("sendChatAction", after=at)
    assert action["action"] == "typing" and action["chat_id"] == 42
    offer_at = next(i for i, (m, p) in enumerate(fake.calls) if m == "sendMessage" and p["text"] == offer["text"])
    assert typing_at < offer_at
    data = buttons(offer)
    assert data[-1].startswith("regen:") and len(data) == offer["text"].count("️⃣") + 1
    set_id = data[0].split(":")[1]
    assert engine.store.set_for_message("telegram", f"42:{message_id}") == set_id

    offered = copy.deepcopy(offer)
    at = len(fake.calls)
    query = await fake.click(ALICE, message_id, data[1])
    answer = await fake.wait_answered(query["id"])
    assert "2번을 골랐어" in answer.get("text", "")
    _, edit = await fake.wait_for("editMessageText", after=at)
    picked = engine.store.pick_of(set_id)
    assert picked["idx"] == 1 and edit["text"].startswith(f"하루: {picked['text']}")
    assert [b["text"] for b in fake.messages[message_id]["reply_markup"]["inline_keyboard"][0]] == ["👍", "👎"]

    query = await fake.click_raw(ALICE, offered, data[1])  # a double press on the old keyboard
    await fake.wait_answered(query["id"])
    query = await fake.click_raw(ALICE, offered, data[0])  # then another candidate of the same set
    answer = await fake.wait_answered(query["id"])
    assert answer["show_alert"] and "이미 2번을 골랐어" in answer["text"]
    assert engine.store.stats()["picks"] == 1 and fake.count("editMessageText") == 1

    query = await fake.click(ALICE, message_id, f"thumb:{set_id}:up")
    assert "고마워" in (await fake.wait_answered(query["id"]))["text"]
    assert [tuple(r) for r in engine.store.db.execute("SELECT user_id, value FROM reactions")] == [("telegram:42", 1)]

    _, next_one = await say(fake, "응 그래서?")  # the conversation continues from the picked reply
    next_set = engine.store.candidate_set(buttons(next_one)[0].split(":")[1])
    assert picked["text"] in next_set["prompt"]


async def test_bad_presses_get_clear_answers_and_change_nothing(telegram_env, engine):
    fake = telegram_env
    message_id, offer = await say(fake, "배고파")
    data = buttons(offer)

    query = await fake.click(MALLORY, message_id, data[0])  # a forwarded offer pressed by someone else
    answer = await fake.wait_answered(query["id"])
    assert answer["show_alert"] and "다른 사람의 선택지" in answer["text"]
    query = await fake.click_raw(ALICE, offer, "pick:zz:banana")  # data that does not parse
    assert "버튼은 이제 쓸 수 없어" in (await fake.wait_answered(query["id"]))["text"]
    set_id = data[0].split(":")[1]
    query = await fake.click_raw(ALICE, offer, f"pick:{set_id}:²")  # a digit to isdigit(), not to int()
    assert "버튼은 이제 쓸 수 없어" in (await fake.wait_answered(query["id"]))["text"]
    query = await fake.click_raw(ALICE, offer, "pick:000000000000:0")  # a set that never existed
    assert "찾을 수 없어" in (await fake.wait_answered(query["id"]))["text"]

    at = len(fake.calls)
    await fake.send(ALICE, "/reset")
    await fake.wait_for("sendMessage", after=at)
    query = await fake.click(ALICE, message_id, data[0])  # a stale button after reset
    answer = await fake.wait_answered(query["id"])
    assert answer["show_alert"] and "지난 거라" in answer["text"]
    query = await fake.click(ALICE, message_id, data[-1])  # and its regenerate button
    assert "지난 거라" in (await fake.wait_answered(query["id"]))["text"]
    assert engine.store.stats()["picks"] == 0 and fake.count("editMessageText") == 0


async def test_regenerate_button_replaces_the_offer(telegram_env, engine):
    fake = telegram_env
    message_id, offer = await say(fake, "심심해")
    set_id = buttons(offer)[0].split(":")[1]
    at = len(fake.calls)
    query = await fake.click(ALICE, message_id, buttons(offer)[-1])
    await fake.wait_answered(query["id"])
    new_id, new_offer = await next_offer(fake, at)
    await fake.wait_for("editMessageReplyMarkup", after=at)
    assert "reply_markup" not in fake.messages[message_id]  # the replaced candidates lose their buttons
    assert engine.store.candidate_set(set_id)["status"] == "regenerated"
    assert buttons(new_offer)[0].split(":")[1] != set_id


async def test_media_edits_commands_and_blocked_users(telegram_env, engine):
    fake = telegram_env
    for kind in ("photo", "sticker", "voice"):
        at = len(fake.calls)
        await fake.send_media(ALICE, kind)
        _, reply = await fake.wait_for("sendMessage", after=at)
        assert "글자로 된 메시지만" in reply["text"]
    at = len(fake.calls)
    sent = await fake.send(ALICE, "/help")
    _, helped = await fake.wait_for("sendMessage", after=at)
    assert "/forget" in helped["text"]
    at = len(fake.calls)
    await fake.send_edited(ALICE, sent["message_id"], "/help me")
    _, reply = await fake.wait_for("sendMessage", after=at)
    assert "고친 메시지" in reply["text"]
    reply = await answer_to(fake, ALICE, "/dance")
    assert "모르는 명령" in reply["text"] and "/dance" in reply["text"]
    reply = await answer_to(fake, ALICE, "/persona sam")
    assert "Switched to Sam" in reply["text"]

    reply = await answer_to(fake, ALICE, "/learning off")
    assert "learn from your picks any more" in reply["text"] and not engine.learning_enabled(UserRef("telegram", "42"))
    reply = await answer_to(fake, ALICE, "/learning")
    assert "/learning on" in reply["text"]

    fake.blocked_chats.add(66)
    attempts = len(fake.attempts)
    await fake.send(MALLORY, "안녕?")
    await fake.wait_attempt("sendMessage", after=attempts)
    turns = engine.store.db.execute("SELECT count(*) FROM turns WHERE user_id = 'telegram:66' AND role = 'user'")
    assert turns.fetchone()[0] == 1  # stored although Telegram refused the reply
    _, offer = await say(fake, "나는 아직 여기 있어")  # everyone else is still served
    assert buttons(offer)


async def test_admin_commands_only_for_admins(telegram_env, engine, settings):
    fake = telegram_env
    for command in ("/status", "/pause", "/rollback telegram:42", "/stats"):
        reply = await answer_to(fake, MALLORY, command)
        assert "관리자만" in reply["text"], command
    assert engine.store.flag("learning_paused") is None

    reply = await answer_to(fake, ADMIN, "/status")
    assert "serving" in reply["text"]
    at = len(fake.calls)
    await fake.send(ADMIN, "/pause")
    await fake.wait_for("sendMessage", after=at)
    assert engine.store.flag("learning_paused") == "1"
    at = len(fake.calls)
    await fake.send(ADMIN, "/resume")
    await fake.wait_for("sendMessage", after=at)
    assert engine.store.flag("learning_paused") is None
    reply = await answer_to(fake, ADMIN, "/rollback telegram:42")
    assert "telegram:42" in reply["text"]  # no generations yet: a clear answer, nothing changes

    at = len(fake.calls)
    await fake.send(ADMIN, "/train")
    started_at, started = await fake.wait_for("sendMessage", after=at)
    _, finished = await fake.wait_for("sendMessage", after=started_at + 1, timeout=120)
    assert "학습을 시작할게" in started["text"] and "학습 끝" in finished["text"]
    assert engine.store.db.execute("SELECT count(*) FROM rollover_runs").fetchone()[0] == 1

    path = settings.storage.generations_dir / "telegram:42" / "gen-1"
    engine.store.add_generation("telegram:42", 1, str(path), None, "promoted",
                                {"accuracy": 0.8, "accuracy_base": 0.4, "distinct2": 0.9, "distinct2_base": 0.95},
                                0)
    at = len(fake.calls)
    await fake.send(ADMIN, "/stats telegram:42")
    _, photo = await fake.wait_for("sendPhoto", after=at)
    assert photo["photo"]["content"][:8] == b"\x89PNG\r\n\x1a\n" and "picks" in photo["caption"]


async def test_export_and_forget_with_confirmation(telegram_env, engine):
    fake = telegram_env
    await say(fake, "내 고양이 이름은 콩이야")
    at = len(fake.calls)
    await fake.send(ALICE, "/export")
    _, document = await fake.wait_for("sendDocument", after=at)
    exported = json.loads(document["document"]["content"])
    assert document["document"]["filename"] == "banryeo-export.json"
    assert exported["format"] == "banryeo-export-1" and exported["user"]["id"] == "telegram:42"
    assert "콩이" in json.dumps(exported, ensure_ascii=False)

    at = len(fake.calls)
    await fake.send(ALICE, "/forget")
    _, asked = await fake.wait_for("sendMessage", after=at)
    assert "되돌릴 수 없어" in asked["text"]
    confirm = next(m for m in reversed(list(fake.messages.values())) if m.get("text") == asked["text"])
    query = await fake.click_raw(MALLORY, confirm, "forget:telegram:42:yes")  # forwarded to someone else
    assert "다른 사람" in (await fake.wait_answered(query["id"]))["text"]
    assert engine.store.user("telegram:42") is not None
    at = len(fake.calls)
    await fake.click(ALICE, confirm["message_id"], "forget:telegram:42:yes")
    _, done = await fake.wait_for("editMessageText", after=at)
    assert "다 지웠어" in done["text"] and engine.store.user("telegram:42") is None


async def test_groups_are_ignored_unless_addressed(telegram_env, engine, settings):
    fake = telegram_env
    room = group(900, "friends")
    at = len(fake.calls)
    await fake.send(ALICE, "hello everyone", chat=room)
    await asyncio.sleep(1.5)
    assert sent_after(fake, at) == []

    settings.telegram.answer_in_groups = True
    await fake.send(ALICE, "just chatting", chat=room)
    await fake.send(ALICE, f"@{BOT_USER['username']} 안녕!", chat=room)
    message_id, offer = await next_offer(fake, at)
    assert offer["chat"]["id"] == room["id"]
    texts = [r[0] for r in engine.store.db.execute("SELECT text FROM turns WHERE role = 'user'")]
    assert texts == ["안녕!"]
    query = await fake.click(MALLORY, message_id, buttons(offer)[0])  # another member's press
    assert "다른 사람의 선택지" in (await fake.wait_answered(query["id"]))["text"]
    reply = await answer_to(fake, ALICE, "/export", chat=room)
    assert "1:1 대화에서만" in reply["text"]


async def test_a_group_never_sees_the_private_conversation(telegram_env, engine, settings):
    fake = telegram_env
    settings.telegram.answer_in_groups = True
    room = group(901, "friends")
    await say(fake, "비밀인데 내 비밀번호는 hunter2야")  # in the private chat
    at = len(fake.calls)
    await fake.send(ALICE, f"@{BOT_USER['username']} 다들 안녕!", chat=room)
    _, group_offer = await next_offer(fake, at)

    def newest_prompt() -> str:
        return engine.store.db.execute("SELECT prompt FROM candidate_sets ORDER BY created_at DESC").fetchone()[0]

    group_prompt = newest_prompt()
    assert "다들 안녕!" in group_prompt and "hunter2" not in group_prompt
    await say(fake, "아까 말한 거 기억해?")  # the private chat goes on where it was
    private_prompt = newest_prompt()
    assert "hunter2" in private_prompt and "다들 안녕!" not in private_prompt
    query = await fake.click(ALICE, group_offer["message_id"], buttons(group_offer)[0])  # the group offer stays open
    assert "1" in (await fake.wait_answered(query["id"]))["text"]


async def test_rate_limits_are_waited_out(telegram_env, engine):
    fake = telegram_env
    fake.rate_limit_next["sendMessage"] = 1
    attempts = len(fake.attempts)
    _, offer = await say(fake, "안녕")
    assert buttons(offer) and any(status == 429 for _, _, status in fake.attempts[attempts:])


async def test_polling_survives_an_outage_and_nothing_sent_meanwhile_is_lost(telegram_env, engine):
    fake = telegram_env
    fake.outage = True
    attempts = len(fake.attempts)
    await fake.send(ALICE, "끊겼을 때 보낸 말")  # waits in Telegram's queue while the bot cannot reach it
    for _ in range(2):  # the bot keeps polling through the failures
        attempts, _, status = await fake.wait_attempt("getUpdates", after=attempts, timeout=30)
        assert status == 502
        attempts += 1
    fake.outage = False
    _, offer = await next_offer(fake, len(fake.calls))
    assert buttons(offer)
    assert [r[0] for r in engine.store.db.execute("SELECT text FROM turns WHERE role = 'user'")] == ["끊겼을 때 보낸 말"]


def test_offers_fit_telegrams_message_limit():
    offer = Offer("abc", ["가" * 5000, "나" * 3000, "다"], [Notice("fewer_candidates", {"count": 3})])
    text = offer_text(offer, "en", ["Your message was long."])
    assert len(text) <= MESSAGE_LIMIT and text.count("…") == 2 and "3️⃣ 다" in text


def test_button_data_is_parsed_strictly():
    assert parse_button("pick:abc123:2").value == "2"
    assert parse_button("regen:abc123").action == "regen"
    assert parse_button("thumb:abc123:down").value == "down"
    forget = parse_button("forget:telegram:42:yes")
    assert (forget.action, forget.target, forget.value) == ("forget", "telegram:42", "yes")
    for bad in (None, "", "pick", "pick:abc", "pick:abc:-1", "pick:abc:999", "thumb:abc:meh", "x" * 64,
                "regen:a:b", "forget:telegram:42:maybe", "pick:abc123:²", "pick:abc123:٣", "regen:가나",
                "thumb:ABC:up"):
        assert parse_button(bad) is None, bad


async def test_webhook_mode(engine, settings):
    fake = FakeTelegram()
    await fake.start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.telegram.api_base = fake.base_url
    settings.telegram.mode = "webhook"
    settings.telegram.webhook_url = f"http://127.0.0.1:{port}/hook/secret-path"
    settings.telegram.webhook_port = port
    companion = TelegramCompanion(engine, Admin(engine.store, settings), settings)
    task = asyncio.create_task(run_telegram(build_application(companion, fake.token), companion, settings))
    try:
        _, webhook = await fake.wait_for("setWebhook", timeout=30)
        assert webhook["url"] == settings.telegram.webhook_url and len(webhook["secret_token"]) >= 32
        update = {"update_id": 1, "message": {"message_id": 1, "date": 1764000000, "text": "/start",
                                              "chat": {"id": 42, "type": "private", "first_name": "Alice"},
                                              "from": ALICE, "entities": [{"type": "bot_command", "offset": 0,
                                                                           "length": 6}]}}
        async with aiohttp.ClientSession() as http:
            for _ in range(100):  # PTB registers the webhook first, then starts listening
                try:
                    await http.get(f"http://127.0.0.1:{port}/")
                    break
                except aiohttp.ClientConnectorError:
                    await asyncio.sleep(0.05)
            forged = await http.post(webhook["url"], json=update,
                                     headers={"X-Telegram-Bot-Api-Secret-Token": "guess"})
            assert forged.status == 403  # only Telegram knows the secret
            real = await http.post(webhook["url"], json=update,
                                   headers={"X-Telegram-Bot-Api-Secret-Token": webhook["secret_token"]})
            assert real.status == 200
        _, greeting = await fake.wait_for("sendMessage", timeout=30)
        assert greeting["text"].startswith("하루:") and fake.count("sendMessage") == 1
        assert fake.count("getUpdates") == 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await fake.stop()


async def test_banryeo_run_serves_telegram_and_discord_in_one_process(tmp_path, tiny_model_dir):
    telegram, discord = FakeTelegram(), FakeDiscord(token="run-token")
    await telegram.start()
    await discord.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANRYEO_")}
    env.update({"DISCORD_TOKEN": "run-token", "TELEGRAM_TOKEN": telegram.token,
                "BANRYEO_DISCORD__API_BASE": discord.api_base, "BANRYEO_DISCORD__GATEWAY_URL": discord.gateway_url,
                "BANRYEO_TELEGRAM__API_BASE": telegram.base_url, "BANRYEO_TELEGRAM__POLL_TIMEOUT": "1",
                "BANRYEO_MODEL__NAME": str(tiny_model_dir), "BANRYEO_MODEL__DTYPE": "float32",
                "BANRYEO_SAMPLING__MAX_NEW_TOKENS": "8", "BANRYEO_STORAGE__DATA_DIR": str(tmp_path / "data"),
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "run", cwd=tmp_path, env=env,
                                                   stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await asyncio.wait_for(discord.ready.wait(), 120)
        await telegram.wait_attempt("getUpdates", timeout=120)
        await telegram.send(ALICE, "안녕 텔레그램")
        await discord.dm(discord_user(42, "alice"), "안녕 디스코드")
        _, on_telegram = await telegram.wait_for("sendMessage", timeout=120)
        _, on_discord = await discord.wait_for("POST", "/channels/500/messages", timeout=120)
        assert on_telegram["text"].startswith("하루:") and on_discord["content"].startswith("하루:")
    finally:
        process.terminate()
        await process.wait()
        await telegram.stop()
        await discord.stop()


async def test_the_users_app_language_chooses_the_bots_words(telegram_env, engine):
    fake = telegram_env
    jane = user(88, "Jane", language_code="en")
    hello = await answer_to(fake, jane, "/start")
    assert hello["text"].startswith("하루: ")  # the default persona speaks Korean
    assert hello["text"].endswith("하루 answers in another language. For an English-speaking companion: /persona sam")
    helped = await answer_to(fake, jane, "/help")
    assert helped["text"].startswith("Talk to me") and "/persona sam" in helped["text"]
    switched = await answer_to(fake, jane, "/persona sam")
    assert switched["text"].startswith("Switched to Sam") and "another language" not in switched["text"]
    minsu = user(89, "민수", language_code="ko")
    switched = await answer_to(fake, minsu, "/persona sam")  # a Korean app with the English persona
    assert switched["text"].startswith("페르소나를 Sam(으)로 바꿨어") and "/persona haru" in switched["text"]
    assert "There is no persona 'nobody'" in (await answer_to(fake, jane, "/persona nobody"))["text"]
    other = user(90, "Pierre", language_code="fr")  # no texts in French: the persona's language
    assert (await answer_to(fake, other, "/help"))["text"].startswith("말을 걸면")
