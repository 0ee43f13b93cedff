"""Shared fixtures: a tiny random model built on the spot, settings pointing at temp folders, a store.

The tiny model is a real Gemma 3 architecture (2 layers, hidden size 32) with a byte-level BPE
tokenizer trained here on a few Korean and English lines, so engine tests run the real transformers
generate path in milliseconds. Tests marked `embedded` use the real Gemma 3 270M model instead.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from bot.config import Settings, load_settings

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
