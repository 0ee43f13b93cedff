"""The bot's own messages exist in Korean and English with the same placeholders."""

import string

import pytest

from bot.messages import LANGUAGES, MESSAGES, render


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@pytest.mark.parametrize("key", sorted(MESSAGES))
def test_every_message_in_both_languages_with_the_same_parameters(key):
    texts = MESSAGES[key]
    assert set(texts) == set(LANGUAGES)
    assert all(t.strip() for t in texts.values())
    assert placeholders(texts["ko"]) == placeholders(texts["en"])


def test_render_fills_parameters_and_falls_back_to_korean():
    assert render("pick_out_of_range", "en", count=3) == "Pick a number from 1 to 3."
    assert "3" in render("pick_out_of_range", "ko", count=3)
    assert render("empty_message", "fr") == MESSAGES["empty_message"]["ko"]


def test_engine_error_keys_all_have_messages():
    import pathlib
    import re

    source = "".join(p.read_text() for p in (pathlib.Path(__file__).parents[1] / "bot").glob("*.py"))
    used = set(re.findall(r'(?:EngineError|Notice|say)\("([a-z_]+)"', source))
    assert used and used <= set(MESSAGES)
