"""The real discord.py client against a local fake Discord (REST v10 + gateway on 127.0.0.1)."""

import asyncio

import pytest

from bot.discord_bot import PICK_EMOJIS, REGENERATE
from tests.conftest import answer, pick_buttons, send_and_get_offer
from tests.fake_discord import BOT_USER, FakeDiscord, user

ALICE = user(42, "alice")
MALLORY = user(66, "mallory")
ADMIN = user(7, "admin")


async def test_dm_offer_reaction_pick_and_edit(discord_env, engine):
    fake, bot = discord_env
    assert fake.identify["intents"] & (1 << 12) and fake.identify["intents"] & (1 << 13)  # DM messages, reactions
    assert {c["name"] for c in fake.commands} >= {"help", "reset", "persona", "status", "train", "rollback", "stats"}
    message_id, body = await send_and_get_offer(fake)
    assert body["content"].count("\n") >= 3 and "답장을 골라 줘 (1-3)" in body["content"]
    count = body["content"].count("️⃣")
    for emoji in [*PICK_EMOJIS[:count], REGENERATE]:
        await fake.wait_for("PUT", f"/reactions/{emoji}/@me")
    await asyncio.sleep(0.3)  # our own echoed reactions arrive and must be ignored
    assert engine.store.stats()["picks"] == 0

    set_id = engine.store.set_for_message("discord", message_id)
    before = len(fake.calls)
    await fake.react(ALICE["id"], message_id, "2️⃣")
    _, edit = await fake.wait_for("PATCH", f"/messages/{message_id}", after=before)
    offer = engine.store.candidate_set(set_id)
    assert edit["content"].startswith(f"하루: {offer['candidates'][1]['text']}") and "2번을 골랐어" in edit["content"]
    assert engine.store.pick_of(set_id)["idx"] == 1
    for emoji in ("👍", "👎"):  # the footer's rating, ready to tap
        await fake.wait_for("PUT", f"/reactions/{emoji}/@me", after=before)

    await fake.react(ALICE["id"], message_id, "2️⃣")  # a double pick: nothing new
    await fake.react(MALLORY["id"], message_id, "1️⃣")  # someone else's reaction on Alice's offer
    _, notice = await fake.wait_for("POST", "/channels/500/messages", after=len(fake.calls))
    assert "찾을 수 없어" in notice["content"]
    assert engine.store.stats()["picks"] == 1 and fake.count("PATCH", f"/messages/{message_id}") == 1


async def test_old_offers_regenerate_and_text_free_messages(discord_env, engine):
    fake, bot = discord_env
    old_id, _ = await send_and_get_offer(fake)
    new_id, _ = await send_and_get_offer(fake, text="아니다, 배고파")
    at = len(fake.calls)
    await fake.react(ALICE["id"], old_id, "1️⃣")
    _, notice = await fake.wait_for("POST", "/channels/500/messages", after=at)
    assert "지난 거라" in notice["content"]

    at = len(fake.calls)
    await fake.react(ALICE["id"], new_id, REGENERATE)
    await fake.wait_for("POST", "/typing", after=at)
    _, regenerated = await fake.wait_for("POST", "/channels/500/messages", after=at)
    assert "1️⃣" in regenerated["content"]
    assert engine.store.candidate_set(engine.store.set_for_message("discord", new_id))["status"] == "regenerated"

    at = len(fake.calls)
    await fake.dm(ALICE, "", attachments=[{"id": "9", "filename": "cat.png", "size": 10, "url": "http://x/cat.png",
                                           "proxy_url": "http://x/cat.png"}])
    _, reply = await fake.wait_for("POST", "/channels/500/messages", after=at)
    assert "글자로 된 메시지만" in reply["content"]


async def test_buttons_pick_through_interactions(discord_env, engine, settings):
    fake, bot = discord_env
    settings.discord.pick_with = "buttons"
    message_id, body = await send_and_get_offer(fake)
    custom_ids = pick_buttons(body)
    set_id = engine.store.set_for_message("discord", message_id)
    assert custom_ids[0] == f"banryeo:pick:{set_id}:0"
    assert fake.count("PUT", "/reactions/") == 0
    at = len(fake.calls)
    await fake.click(ALICE, message_id, custom_ids[-1])
    _, ack = await fake.wait_for("POST", "/callback", after=at)
    assert ack["type"] == 6  # deferred update: the click is acknowledged
    _, edit = await fake.wait_for("PATCH", f"/messages/{message_id}", after=at)
    assert edit["components"] == [] and engine.store.pick_of(set_id)["idx"] == len(custom_ids) - 1

    message_id, body = await send_and_get_offer(fake, text="또 왔어")
    custom_ids = pick_buttons(body)
    at = len(fake.calls)
    await fake.click(MALLORY, message_id, custom_ids[0])  # someone else presses Alice's button
    _, refusal = await fake.wait_for("POST", "/webhooks/", after=at)
    assert refusal["flags"] & 64 and "찾을 수 없어" in refusal["content"]  # told to the presser only
    assert not [body for method, path, body in fake.calls[at:] if method == "POST" and "/channels/" in path]


async def test_admin_commands_only_for_admins(discord_env, engine):
    fake, bot = discord_env
    admin_commands = [c for c in fake.commands if c["name"] in ("status", "train", "rollback", "stats", "pause",
                                                                 "resume")]
    assert len(admin_commands) == 6  # in no one's DM menu; in servers only for members with Administrator
    assert all(c["contexts"] == [0] and str(c["default_member_permissions"]) == "8" for c in admin_commands)
    with pytest.raises(LookupError):
        await fake.slash(ADMIN, "status")
    at = len(fake.calls)
    await fake.slash(MALLORY, "status", guild="900", permissions="8")  # a server admin is not a bot admin
    refused = await answer(fake, at)
    assert refused["flags"] & 64 and "관리자만" in refused["content"]
    at = len(fake.calls)
    await fake.slash(ADMIN, "status", guild="900", permissions="8")
    status = await answer(fake, at)
    assert status["flags"] & 64 and "serving" in status["content"]
    at = len(fake.calls)
    await fake.slash(MALLORY, "rollback", [{"name": "lineage", "type": 3, "value": "discord:42"}], guild="900")
    assert "관리자만" in (await answer(fake, at))["content"]
    at = len(fake.calls)
    await fake.slash(ADMIN, "train", guild="900", permissions="8")
    started = await answer(fake, at)
    index, _ = await fake.wait_for("POST", "/webhooks/", after=at)
    _, finished = await fake.wait_for("POST", "/webhooks/", after=index + 1, timeout=120)
    assert "학습을 시작할게" in started["content"] and "학습 끝" in finished["content"]


async def test_user_commands_and_guilds(discord_env, engine):
    fake, bot = discord_env
    at = len(fake.calls)
    await fake.slash(ALICE, "persona", [{"name": "name", "type": 3, "value": "sam"}])
    switched = await answer(fake, at)  # Alice's Discord app is in Korean: the bot's words stay Korean
    assert "Sam(으)로 바꿨어" in switched["content"] and "\nSam: " in switched["content"]
    assert "Sam은(는) 다른 언어로 대답해. 한국어로 이야기하려면 /persona haru" in switched["content"]
    at = len(fake.calls)
    await fake.slash(ALICE, "persona", [{"name": "name", "type": 3, "value": "nobody"}])
    refused = await answer(fake, at)  # the public "thinking…" is replaced by a refusal only Alice sees
    assert refused["flags"] & 64 and "'nobody'" in refused["content"]
    assert fake.count("DELETE", "/messages/@original") == 1
    at = len(fake.calls)
    await fake.slash(ALICE, "learning", [{"name": "choice", "type": 3, "value": "off"}])
    reply = await answer(fake, at)
    assert "/learning on" in reply["content"] and engine.store.user("discord:42")["learning_opt_out"] == 1
    at = len(fake.calls)
    await fake.slash(ALICE, "help")
    helped = await answer(fake, at)
    assert "/forget" in helped["content"] and "👍" in helped["content"] and helped["flags"] & 64
    at = len(fake.calls)
    await fake.dispatch("MESSAGE_CREATE", {**(await _guild_message()), "guild_id": "900"})
    await asyncio.sleep(0.5)
    assert fake.count("POST", "/channels/600/messages") == 0


async def test_rate_limits_are_waited_out(discord_env, engine):
    fake, bot = discord_env
    fake.rate_limit_next["/channels/500/messages"] = 1
    message_id, body = await send_and_get_offer(fake)
    assert "1️⃣" in body["content"]


async def _guild_message():
    return {"id": "3000", "channel_id": "600", "type": 0, "content": "hello bot", "author": ALICE,
            "timestamp": "2026-11-24T12:00:00+00:00", "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [], "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": False, "flags": 0, "components": []}


async def offer_in_server_channel(fake, text: str, message_id: str) -> dict:
    """Alice mentions the bot in server channel 600; the offer it posts there."""
    at = len(fake.calls)
    mention = {**(await _guild_message()), "id": message_id, "guild_id": "900",
               "content": f"<@{BOT_USER['id']}> {text}", "mentions": [BOT_USER]}
    await fake.dispatch("MESSAGE_CREATE", mention)
    _, body = await fake.wait_for("POST", "/channels/600/messages", after=at)
    while "1️⃣" not in body["content"]:
        _, body = await fake.wait_for("POST", "/channels/600/messages", after=len(fake.calls))
    return body


async def test_a_user_who_blocked_the_bot_loses_nothing_and_others_go_on(discord_env, engine):
    fake, bot = discord_env
    fake.blocked_channels.add("501")
    at = len(fake.calls)
    await fake.dm(MALLORY, "안녕?", channel="501")
    await fake.wait_for("POST", "/channels/501/messages", after=at)
    await asyncio.sleep(0.2)
    turns = engine.store.db.execute("SELECT count(*) FROM turns WHERE user_id = 'discord:66' AND role = 'user'")
    assert turns.fetchone()[0] == 1  # the message and its candidates are stored even though Discord refused
    message_id, body = await send_and_get_offer(fake)  # the bot still serves everyone else
    assert "1️⃣" in body["content"]



async def test_banryeo_run_starts_discord_when_a_token_is_set(tmp_path, tiny_model_dir):
    import os
    import sys
    from pathlib import Path

    fake = FakeDiscord(token="run-token")
    await fake.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANRYEO_") and k != "TELEGRAM_TOKEN"}
    env.update({"DISCORD_TOKEN": "run-token", "BANRYEO_DISCORD__API_BASE": fake.api_base,
                "BANRYEO_DISCORD__GATEWAY_URL": fake.gateway_url, "BANRYEO_MODEL__NAME": str(tiny_model_dir),
                "BANRYEO_MODEL__DTYPE": "float32", "BANRYEO_SAMPLING__MAX_NEW_TOKENS": "8",
                "BANRYEO_STORAGE__DATA_DIR": str(tmp_path / "data"),
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "run", cwd=tmp_path, env=env,
                                                   stdin=asyncio.subprocess.DEVNULL,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await asyncio.wait_for(fake.ready.wait(), 120)
        at = len(fake.calls)
        await fake.dm(ALICE, "안녕")
        _, body = await fake.wait_for("POST", "/channels/500/messages", after=at, timeout=120)
        assert body["content"].startswith("하루:")  # the greeting, then the candidates
    finally:
        process.terminate()
        await process.wait()
        await fake.stop()


async def test_export_forget_with_confirmation_and_pause(discord_env, engine):
    fake, bot = discord_env
    await send_and_get_offer(fake)
    at = len(fake.calls)
    await fake.slash(ALICE, "export")
    exported = await answer(fake, at)
    assert isinstance(exported, bytes) and b"banryeo-export-1" in exported and b'"discord:42"' in exported

    at = len(fake.calls)
    await fake.slash(ALICE, "forget")
    asked = await answer(fake, at)
    assert "되돌릴 수 없어" in asked["content"] and asked["flags"] & 64
    buttons = [c["custom_id"] for row in asked["components"] for c in row["components"]]
    confirm = next(m for m in fake.messages.values() if m["content"] == asked["content"])
    at = len(fake.calls)
    await fake.click(MALLORY, confirm["id"], buttons[0])  # not hers to confirm
    _, refused = await fake.wait_for("POST", "/callback", after=at)
    assert "다른 사람" in refused["data"]["content"]
    at = len(fake.calls)
    assert engine.store.user("discord:42") is not None
    await fake.click(ALICE, confirm["id"], buttons[0])
    done = await answer(fake, at)
    assert "다 지웠어" in done["content"] and done["components"] == []
    assert engine.store.user("discord:42") is None and engine.store.stats()["candidate_sets"] == 0

    at = len(fake.calls)
    await fake.slash(MALLORY, "pause", guild="900")
    refused = await answer(fake, at)
    assert "관리자만" in refused["content"] and engine.store.flag("learning_paused") is None
    at = len(fake.calls)
    await fake.slash(ADMIN, "pause", guild="900", permissions="8")
    await fake.wait_for("POST", "/callback", after=at)
    assert engine.store.flag("learning_paused") == "1"


async def test_thumbs_on_a_picked_reply(discord_env, engine):
    fake, bot = discord_env
    message_id, _ = await send_and_get_offer(fake)
    set_id = engine.store.set_for_message("discord", message_id)
    at = len(fake.calls)
    await fake.react(ALICE["id"], message_id, "👍")  # nothing picked yet: nothing to rate, nothing stored
    await fake.react(ALICE["id"], message_id, "1️⃣")
    await fake.wait_for("PATCH", f"/messages/{message_id}", after=at)
    turn_id = engine.store.pick_of(set_id)["turn_id"]

    def thumbs():
        return [tuple(r) for r in engine.store.db.execute("SELECT user_id, turn_id, value FROM reactions")]

    assert thumbs() == []
    await fake.react(ALICE["id"], message_id, "👎")
    await fake.react(MALLORY["id"], message_id, "👍")  # not her reply to rate
    for _ in range(100):
        if thumbs():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert thumbs() == [("discord:42", turn_id, -1)]
    await fake.unreact(ALICE["id"], message_id, "👎")
    for _ in range(100):
        if not thumbs():
            break
        await asyncio.sleep(0.05)
    assert thumbs() == []


async def test_a_pick_while_regenerating_is_either_taken_or_refused_never_both(discord_env, engine):
    fake, bot = discord_env
    message_id, _ = await send_and_get_offer(fake)
    set_id = engine.store.set_for_message("discord", message_id)
    at = len(fake.calls)
    await fake.react(ALICE["id"], message_id, REGENERATE)
    await fake.react(ALICE["id"], message_id, "2️⃣")
    _, answer = await fake.wait_for("POST", "/channels/500/messages", after=at)
    if engine.store.pick_of(set_id) is not None:  # the pick came first: nothing left to regenerate
        assert "이미 2번을 골랐어" in answer["content"]
        assert engine.store.candidate_set(set_id)["status"] == "picked"
    else:  # the regenerate came first: the pick on the replaced candidates is refused, the new offer stands
        assert engine.store.candidate_set(set_id)["status"] == "regenerated"
        posted = [body["content"] for m, p, body in fake.calls[at:] if m == "POST" and p.endswith("/messages")]
        while len(posted) < 2:
            await fake.wait_for("POST", "/channels/500/messages", after=len(fake.calls))
            posted = [body["content"] for m, p, body in fake.calls[at:] if m == "POST" and p.endswith("/messages")]
        assert any("지난 거라" in text for text in posted) and any("1️⃣" in text for text in posted)
    assert engine.store.stats()["picks"] <= 1


async def test_a_dropped_gateway_connection_resumes(discord_env, engine):
    fake, bot = discord_env
    await fake.drop_connection()
    await asyncio.wait_for(fake.ready.wait(), 30)
    assert fake.connections == 2 and fake.resumes and fake.resumes[0]["session_id"] == "sess-1"
    message_id, body = await send_and_get_offer(fake)  # DMs after the reconnect are answered as before
    assert "1️⃣" in body["content"]


async def test_guild_mentions_are_answered_when_enabled(discord_env, engine, settings):
    fake, bot = discord_env
    settings.discord.answer_in_guilds = True
    at = len(fake.calls)
    plain = await _guild_message()
    await fake.dispatch("MESSAGE_CREATE", {**plain, "guild_id": "900"})  # not addressed to the bot
    mention = {**plain, "id": "3001", "guild_id": "900", "content": f"<@{BOT_USER['id']}> 안녕!",
               "mentions": [BOT_USER]}
    await fake.dispatch("MESSAGE_CREATE", mention)
    _, body = await fake.wait_for("POST", "/channels/600/messages", after=at)
    while "1️⃣" not in body["content"]:
        _, body = await fake.wait_for("POST", "/channels/600/messages", after=len(fake.calls))
    turns = [r[0] for r in engine.store.db.execute("SELECT text FROM turns WHERE role = 'user'")]
    assert turns == ["안녕!"]  # the mention itself is not part of the message


async def test_the_bots_messages_never_ping_anyone(discord_env):
    fake, bot = discord_env
    at = len(fake.calls)
    await send_and_get_offer(fake, text="@everyone 안녕")
    posts = [body for method, path, body in fake.calls[at:] if method == "POST" and path.endswith("/messages")]
    assert posts and all(body.get("allowed_mentions") == {"parse": []} for body in posts), posts


async def test_a_server_channel_never_sees_the_private_conversation(discord_env, engine, settings):
    fake, bot = discord_env
    settings.discord.answer_in_guilds = True
    await send_and_get_offer(fake, text="비밀인데 내 비밀번호는 hunter2야")
    await offer_in_server_channel(fake, "다들 안녕!", "3002")
    prompts = [row["prompt"] for row in engine.store.db.query("SELECT prompt FROM candidate_sets ORDER BY created_at")]
    assert "hunter2" in prompts[0] and "다들 안녕!" in prompts[-1] and "hunter2" not in prompts[-1]
    chats = [row["chat"] for row in engine.store.db.query("SELECT chat FROM conversations ORDER BY id")]
    assert chats == ["", "600"]  # one conversation in the DM, one in the channel


async def test_the_users_app_language_chooses_the_bots_words(discord_env, engine):
    fake, bot = discord_env
    bob = user(77, "bob")
    at = len(fake.calls)
    await fake.slash(bob, "start", locale="en-US")
    hello = await answer(fake, at)
    assert hello["content"].startswith("하루: ")  # the persona speaks Korean; the bot's own words follow the app
    assert "하루 answers in another language. For an English-speaking companion: /persona sam" in hello["content"]
    message_id, body = await send_and_get_offer(fake, author=bob, text="hi!")  # a message carries no locale
    assert "Pick the reply you like" in body["content"]  # remembered from the command
    at = len(fake.calls)
    await fake.slash(bob, "help", locale="ko")  # the app switched to Korean
    helped = await answer(fake, at)
    assert helped["content"].startswith("말을 걸면") and "다른 언어" not in helped["content"]  # 하루 speaks Korean


class HeldGenerator:
    """The engine's real generator, except that sampling waits for the test's cue: a reply that takes as
    long as the test wants (the embedded model on a busy CPU takes seconds)."""

    def __init__(self, inner):
        self.inner = inner
        self.sampling = asyncio.Event()
        self.release = asyncio.Event()

    async def sample(self, *args, **kwargs):
        self.sampling.set()
        await self.release.wait()
        return await self.inner.sample(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def test_commands_are_answered_within_discords_deadline_while_a_reply_is_sampled(discord_env, engine):
    fake, bot = discord_env
    fake.interaction_deadline = 1.0
    engine.generator = held = HeldGenerator(engine.generator)
    await fake.dm(ALICE, "안녕! 오래 생각해 줘")
    await asyncio.wait_for(held.sampling.wait(), 30)  # Alice's lock is held until the reply is sampled
    at = len(fake.calls)
    await fake.slash(ALICE, "forget")  # no lock needed to ask: it is answered at once
    asked = await answer(fake, at)
    confirm = next(m for m in fake.messages.values() if m["content"] == asked["content"])
    delete = [c["custom_id"] for row in asked["components"] for c in row["components"]][0]
    at = len(fake.calls)
    for name, options in [("reset", None), ("start", None), ("persona", [{"name": "name", "type": 3, "value": "sam"}]),
                          ("learning", [{"name": "choice", "type": 3, "value": "off"}]), ("export", None)]:
        await fake.slash(ALICE, name, options)
    await fake.click(ALICE, confirm["id"], delete)
    while len([1 for m, p, _ in fake.calls[at:] if m == "POST" and p.endswith("/callback")]) < 6:
        await fake.wait_for("POST", "/callback", after=len(fake.calls), timeout=5)
    await asyncio.sleep(fake.interaction_deadline + 0.2)  # every interaction's deadline has passed
    assert fake.late_callbacks == [] and fake.interactions == {}  # each was answered (deferred) in time
    held.release.set()
    for _ in range(200):  # then each gets its answer as a followup once the reply and the lock are through
        answered = [p for m, p, _ in fake.calls[at:] if "/webhooks/" in p and m in ("POST", "PATCH")]
        if len(answered) >= 6:
            break
        await asyncio.sleep(0.05)
    assert len(answered) >= 6 and fake.late_callbacks == []
    assert engine.store.user("discord:42") is None  # the confirmed forget went through last


async def test_a_failed_typing_indicator_loses_no_message(discord_env, engine):
    fake, bot = discord_env
    fake.typing_status["500"] = 403
    at = len(fake.calls)
    await fake.dm(ALICE, "안녕?")
    _, body = await fake.wait_for("POST", "/channels/500/messages", after=at)
    while "1️⃣" not in body["content"]:
        _, body = await fake.wait_for("POST", "/channels/500/messages", after=len(fake.calls))
    assert engine.store.stats()["candidate_sets"] == 1


async def test_reaction_picks_in_a_server_channel(discord_env, engine, settings):
    fake, bot = discord_env
    settings.discord.answer_in_guilds = True
    at = len(fake.calls)
    body = await offer_in_server_channel(fake, "안녕!", "3003")
    message_id = next(mid for mid, m in fake.messages.items() if m["content"] == body["content"])
    await fake.wait_for("PUT", f"/messages/{message_id}/reactions/{REGENERATE}/@me", after=at)
    set_id = engine.store.set_for_message("discord", message_id)
    at = len(fake.calls)
    await fake.react(MALLORY["id"], message_id, "1️⃣", channel="600", guild="900")  # not her offer
    _, refusal = await fake.wait_for("POST", "/channels/500/messages", after=at)  # told in her DMs
    assert "찾을 수 없어" in refusal["content"] and fake.count("POST", "/users/@me/channels") == 1
    assert not [1 for m, p, _ in fake.calls[at:] if m == "POST" and "/channels/600/" in p]
    await fake.react(ALICE["id"], message_id, "2️⃣", channel="600", guild="900")
    _, edit = await fake.wait_for("PATCH", f"/channels/600/messages/{message_id}", after=at)
    assert "2번을 골랐어" in edit["content"] and engine.store.pick_of(set_id)["idx"] == 1


async def test_buttons_mode_can_regenerate(discord_env, engine, settings):
    fake, bot = discord_env
    settings.discord.pick_with = "buttons"
    message_id, body = await send_and_get_offer(fake)
    regenerate = [c for row in body["components"] for c in row["components"]][-1]
    assert regenerate["custom_id"].startswith("banryeo:regen:") and regenerate["emoji"]["name"] == REGENERATE
    at = len(fake.calls)
    await fake.click(ALICE, message_id, regenerate["custom_id"])
    _, ack = await fake.wait_for("POST", "/callback", after=at)
    assert ack["type"] == 6
    _, new_offer = await fake.wait_for("POST", "/channels/500/messages", after=at)
    _, old = await fake.wait_for("PATCH", "/messages/@original", after=at)
    assert pick_buttons(new_offer) and old["components"] == []  # the replaced candidates can't be picked
    old_set = engine.store.set_for_message("discord", message_id)
    assert engine.store.candidate_set(old_set)["status"] == "regenerated"
    at = len(fake.calls)
    await fake.click(ALICE, message_id, regenerate["custom_id"])  # an old message's 🔄
    _, refusal = await fake.wait_for("POST", "/webhooks/", after=at)
    assert refusal["flags"] & 64 and "지난 거라" in refusal["content"]


@pytest.fixture
def admin_guild(settings):
    settings.discord.admin_guild_id = 900


async def test_admin_commands_only_in_the_admin_server(admin_guild, discord_env, engine):
    fake, bot = discord_env
    assert not {"status", "train", "rollback", "stats", "pause", "resume"} & {c["name"] for c in fake.commands}
    assert {c["name"] for c in fake.guild_commands["900"]} == {"status", "train", "rollback", "stats", "pause",
                                                                "resume"}
    with pytest.raises(LookupError):
        await fake.slash(ADMIN, "status", guild="901", permissions="8")
    at = len(fake.calls)
    await fake.slash(ADMIN, "status", guild="900", permissions="8")
    assert "serving" in (await answer(fake, at))["content"]


def test_offers_fit_discords_message_limit():
    from bot.discord_bot import MESSAGE_LIMIT, offer_text
    from bot.engine import Offer, Notice

    offer = Offer("abc", ["가" * 3000, "나" * 1500, "다"], [Notice("fewer_candidates", {"count": 3})])
    text = offer_text(offer, "ko", ["메시지가 너무 길어서 앞뒤만 읽었어."])
    assert len(text) <= MESSAGE_LIMIT
    assert text.count("…") == 2 and "3️⃣ 다" in text and "(1-3)" in text
