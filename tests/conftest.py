"""Shared fixtures and helpers: a tiny random model built on the spot, settings pointing at temp folders,
a store and an engine; nights of the rollover; both platforms' bots against their local fakes.

The tiny model is a real Gemma 3 architecture (2 layers, hidden size 32) with a byte-level BPE
tokenizer trained here on a few Korean and English lines, so engine tests run the real transformers
generate path in milliseconds. Tests marked `embedded` use the real Gemma 3 270M model instead.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import discord
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from bot.admin import Admin
from bot.config import Settings, load_settings
from bot.discord_bot import create_discord_bot
from bot.engine import UserRef
from bot.telegram_bot import TelegramCompanion, build_application, run_telegram
from tests.fake_discord import FakeDiscord
from tests.fake_discord import user as discord_user
from tests.fake_telegram import FakeTelegram
from tests.fake_telegram import user as telegram_user
from training.rollover import run_rollover

CORPUS = [
    "안녕! 오늘 하루 어땠어? 나는 배고파. 저녁 뭐 먹지? 라면 어때?",
    "회사에서 발표했는데 떨렸어. 고생했어~ 진짜 멋지다 ㅎㅎ",
    "Hello! How was your day? I am hungry. What should we eat tonight?",
    "나: 하루: You: Sam: 주말에 뭐 해? 강아지 산책 가자!",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_model(folder: Path, chat_template: str | None = None) -> Path:
    """Save a tiny random Gemma 3 model and tokenizer to `folder`; returns it."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = chat_template
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-chat-model"), CHAT_TEMPLATE)


@pytest.fixture
def settings(tmp_path, tiny_model_dir, monkeypatch) -> Settings:
    """Settings for the tiny model with the data folder in tmp_path (and no stray config or tokens)."""
    monkeypatch.chdir(tmp_path)
    for var in ("BANRYEO_CONFIG", "DISCORD_TOKEN", "TELEGRAM_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return load_settings(
        model={"name": str(tiny_model_dir), "dtype": "float32", "prompt_format": "transcript", "seed": 1},
        storage={"data_dir": tmp_path / "data"},
        sampling={"max_new_tokens": 12},
        chat={"messages_per_minute": 1000},  # tests type faster than people; rate-limit tests lower it
    )


@pytest.fixture
def tiny_backend(tiny_model_dir):
    """A fresh backend per test: loaded adapters never leak from one test's generations to another's."""
    from bot.config import ModelSettings
    from bot.model import ModelBackend

    return ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="float32", prompt_format="transcript"))


@pytest.fixture
def store(settings):
    from bot.store import Store

    s = Store(settings.storage.db_path)
    yield s
    s.close()


@pytest.fixture
def engine(settings, store, tiny_backend):
    from bot.engine import DialogueEngine
    from persona import PersonaLibrary

    e = DialogueEngine(store, tiny_backend, PersonaLibrary(settings.storage.persona_dir), settings)
    yield e
    e.close()


@pytest.fixture(scope="session")
def embedded_settings(tmp_path_factory) -> Settings:
    """Settings for the real embedded model (converted once into the user's model cache)."""
    return Settings(storage={"data_dir": tmp_path_factory.mktemp("embedded-data")})


# -- the nightly rollover: lenient and strict gates, a few picks, nights ------------------------------

TEST_ALICE = UserRef("test", "alice")
LENIENT = {"min_accuracy": 0.0, "min_gain_over_base": -1.0, "max_drop_from_current": 1.0, "min_distinct2_ratio": 0.0, "max_self_bleu_ratio": 100.0,
           "max_repetition_rate": 1.0, "length_band": (0.0, 100.0), "max_kl_per_token": 1e9,
           "probe_contexts": 2, "samples_per_context": 2}
STRICT = {**LENIENT, "min_gain_over_base": 1.0}  # nothing can beat the base by a whole accuracy point


def configure(settings, gate):
    settings.training.min_new_picks = 4
    settings.training.epochs = 1
    settings.training.batch_size = 2
    settings.training.grad_accum = 1
    for key, value in gate.items():
        setattr(settings.gate, key, value)
    return settings


async def nights(engine, settings, *gates):
    """One night per gate setting, each after a few new picks; returns the outcomes."""
    outcomes = []
    for gate in gates:
        configure(settings, gate)
        await make_picks(engine)
        outcomes += run_rollover(settings)
    return outcomes


async def make_picks(engine, user=TEST_ALICE, count=6):
    for i in range(count):
        offer = await engine.on_message(user, f"오늘 뭐 먹지? {i}")
        if not offer.auto_picked:
            await engine.on_pick(user, offer.id, 0)


async def eventually(condition, timeout: float = 2.0, interval: float = 0.005) -> None:
    """Wait until `condition()` holds (polled every `interval`), failing the test after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(interval)


def write_config(settings):
    path = settings.storage.data_dir / "banryeo.toml"
    path.write_text(f'[storage]\ndata_dir = "{settings.storage.data_dir}"\n[model]\nname = "{settings.model.name}"\n')
    return path


# -- Discord: the real discord.py client against the local fake ---------------------------------------

DISCORD_ALICE = discord_user(42, "alice")


@pytest.fixture
async def discord_env(engine, settings):
    original = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    fake = FakeDiscord()
    await fake.start()
    settings.discord.api_base = fake.api_base
    settings.discord.gateway_url = fake.gateway_url
    settings.admins = ["discord:7"]
    bot = create_discord_bot(engine, Admin(engine.store, settings), settings, guild_ready_timeout=0)
    fake.bot = bot
    await bot.login(fake.token)
    task = asyncio.create_task(bot.connect(reconnect=True))
    await asyncio.wait_for(bot.wait_until_ready(), 30)
    yield fake, bot
    await bot.close()
    await asyncio.wait_for(task, 30)
    await fake.stop()
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = original


async def send_and_get_offer(fake, author=DISCORD_ALICE, text="안녕! 오늘 피곤했어"):
    start = len(fake.calls)
    await fake.dm(author, text)
    typing_at, _ = await fake.wait_for("POST", "/typing", after=start)
    at, body = await fake.wait_for("POST", "/channels/500/messages", after=start)
    while "1️⃣" not in body["content"]:  # the greeting comes first on a new conversation
        at, body = await fake.wait_for("POST", "/channels/500/messages", after=at + 1)
    assert typing_at < at
    message_id = next(mid for mid, m in fake.messages.items() if m["content"] == body["content"])
    for _ in range(100):  # the bot links the message to its candidate set once Discord answered the post
        if bot_store(fake).set_for_message("discord", message_id):
            break
        await asyncio.sleep(0.05)
    return message_id, body


def bot_store(fake):
    return fake.bot.engine.store


async def answer(fake, at: int, timeout: float = 60):
    """What the user is shown for the interaction sent after call `at`: the callback's message, or, after a
    deferral, the followup (type 5) or the edit of the pressed message (type 6) it promised."""
    index, callback = await fake.wait_for("POST", "/callback", after=at, timeout=timeout)
    if callback["type"] == 5:
        return (await fake.wait_for("POST", "/webhooks/", after=index + 1, timeout=timeout))[1]
    if callback["type"] == 6:
        return (await fake.wait_for("PATCH", "/messages/@original", after=index + 1, timeout=timeout))[1]
    return callback["data"]


def pick_buttons(body) -> list[str]:
    return [c["custom_id"] for row in body["components"] for c in row["components"]
            if c["custom_id"].startswith("banryeo:pick:")]


# -- Telegram: the real python-telegram-bot Application against the local fake -----------------------

TELEGRAM_ALICE = telegram_user(42, "Alice")


@pytest.fixture
async def telegram_env(engine, settings):
    fake = FakeTelegram()
    await fake.start()
    settings.telegram.api_base = fake.base_url
    settings.telegram.poll_timeout = 1
    settings.admins = ["telegram:7"]
    companion = TelegramCompanion(engine, Admin(engine.store, settings), settings)
    application = build_application(companion, fake.token)
    task = asyncio.create_task(run_telegram(application, companion, settings))
    await fake.wait_attempt("getUpdates", timeout=30)
    yield fake
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.stop()


def sent_after(fake, at: int, method: str = "sendMessage") -> list[dict]:
    return [params for m, params in fake.calls[at:] if m == method]


async def next_offer(fake, at: int) -> tuple[int, dict]:
    """The next message with candidate buttons after call index `at`: (message_id, message)."""
    while True:
        at, params = await fake.wait_for("sendMessage", after=at)
        if "pick:" in json.dumps(params.get("reply_markup") or {}):
            message = next(m for m in reversed(list(fake.messages.values())) if m.get("text") == params["text"])
            return message["message_id"], message
        at += 1


def buttons(message: dict) -> list[str]:
    return [b["callback_data"] for row in message["reply_markup"]["inline_keyboard"] for b in row]


async def answer_to(fake, author, text: str, **where) -> dict:
    """Send `text` as `author` (in `chat=...` when given); the bot's next message."""
    at = len(fake.calls)
    await fake.send(author, text, **where)
    _, reply = await fake.wait_for("sendMessage", after=at)
    return reply


async def say(fake, text: str, author=TELEGRAM_ALICE) -> tuple[int, dict]:
    at = len(fake.calls)
    await fake.send(author, text)
    return await next_offer(fake, at)
