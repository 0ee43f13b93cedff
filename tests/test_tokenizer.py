"""The tokenizer alone: what prompts need from a model, without loading its weights."""

import pytest

from bot.config import ModelSettings
from bot.model import ModelBackend, ModelError
from bot.tokenizer import PromptTokenizer


@pytest.mark.parametrize("chat", [False, True])
def test_the_tokenizer_alone_builds_prompts_as_the_backend_does(tiny_model_dir, tiny_chat_model_dir, chat):
    settings = ModelSettings(name=str(tiny_chat_model_dir if chat else tiny_model_dir), dtype="float32")
    prompts, backend = PromptTokenizer.load(settings), ModelBackend.load(settings)
    assert type(prompts) is PromptTokenizer and not hasattr(prompts, "model")
    assert (prompts.name, prompts.generation, prompts.use_chat_template) == \
           (backend.name, backend.generation, backend.use_chat_template) == (str(settings.name), "base", chat)
    text = "안녕! <eos> 오늘 하루 어땠어?"
    assert prompts.count_tokens(text) == backend.count_tokens(text)
    assert prompts.special_tokens.tokens == backend.special_tokens.tokens and "<eos>" in prompts.special_tokens.tokens
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    if chat:
        assert prompts.chat_prompt(messages) == backend.chat_prompt(messages)


def test_a_missing_tokenizer_fails_with_a_clear_error():
    with pytest.raises(ModelError, match="Offline mode"):
        PromptTokenizer.load(ModelSettings(name="nobody/no-such-model-anywhere"))


def test_the_vllm_backend_loads_only_the_tokenizer(settings):
    from bot.cli import build_engine

    settings.serving.backend, settings.serving.vllm_url = "vllm", "http://127.0.0.1:9"
    engine = build_engine(settings)
    try:
        assert type(engine.tokenizer) is PromptTokenizer
        assert type(engine.generator).__name__ == "VllmGenerator"
        assert engine.generator.add_special_tokens == (not engine.tokenizer.use_chat_template)
    finally:
        engine.close()
