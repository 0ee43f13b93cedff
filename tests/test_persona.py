"""Persona cards: the built-ins, the TOML round trip, SillyTavern import, bad files, the library."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from persona import (PersonaCard, PersonaError, PersonaLibrary, builtin_cards_dir, dump_card, import_card,
                     load_card)

V2_CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Luna",
        "description": "{{char}} is a sleepy cat who lives with {{user}}.",
        "personality": "lazy, curious",
        "scenario": "",
        "first_mes": "*yawns* Oh, <USER>, you're back.",
        "alternate_greetings": ["Meow. Food, {{User}}?", "  "],
        "mes_example": ("<START>\n{{user}}: Hi {{char}}!\n{{char}}: *stretches* Hi.\nI was napping.\n"
                        "<START>\nYou: Hungry?\nLuna: Always."),
        "system_prompt": "{{original}} Stay in character.",
        "post_history_instructions": "",
        "creator_notes": "Made for \"testing\" \\ only",
        "tags": ["cat", "cozy"],
        "creator": "someone",
        "character_version": "1.2",
        "extensions": {"talkativeness": "0.5", "depth_prompt": {"depth": 4, "prompt": "purr"}, "fav": False},
        "character_book": {"name": "lore", "scan_depth": None,
                           "entries": [{"keys": ["moon"], "content": "Luna likes\nthe moon.", "id": 1,
                                        "extensions": {}},
                                       {"keys": ["fish"], "content": "Fish!", "id": 2, "priority": 1.5,
                                        "extensions": {"position": 0}}]},
    },
    "talkativeness": "0.5",   # unknown top-level key
    "name": "Luna",           # a V1 copy of data.name, as SillyTavern writes it
}


def write_png(path: Path, chunks: dict[str, dict | str]) -> Path:
    info = PngInfo()
    for keyword, payload in chunks.items():
        text = payload if isinstance(payload, str) else base64.b64encode(json.dumps(payload).encode()).decode()
        info.add_text(keyword, text)
    Image.new("RGB", (4, 4), "white").save(path, pnginfo=info)
    return path


def rich_card() -> PersonaCard:
    return PersonaCard(
        name='하루 "Haru"', description='첫 줄\n둘째 줄에 "따옴표"와 \\ 역슬래시, 탭\t도 있어.\n"""세 개"""\n끝"',
        greetings=["안녕~", 'say "hi" \\ bye', "줄\n바꿈"],
        examples=[[("user", "배고파"), ("char", "라면 먹자 ㅎㅎ")], [("user", "a\"b"), ("char", "c\\d")]],
        style="짧게.\r\n반말.", language="ko", user_label="나", key="haru-2",
        extra={"creator": "me", "n": 3, "ratio": 0.25, "on": True, "tags": ["a", "b\nc"], "empty": {},
               "weird key": {"x.y": 1}, "nested": {"deep": {"list": [1, [2, 3], {"k": "v"}]}, "text": "두\n줄"},
               "entries": [{"id": 1, "sub": {"q": '"'}}, {"id": 2, "items": [{"z": 0}]}], "none": []})


# -- built-ins ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, language", [("haru", "ko"), ("sam", "en")])
def test_builtin_cards_load_with_single_line_turns(key, language):
    card = load_card(builtin_cards_dir() / f"{key}.toml")
    assert card.key == key and card.language == language and card.name and card.description.strip()
    assert len(card.greetings) == 3 and len(card.examples) == 3
    assert card.user_name() == {"ko": "나", "en": "You"}[language]
    for example in card.examples:
        assert 4 <= len(example) <= 6 and {speaker for speaker, _ in example} == {"user", "char"}
    for text in card.greetings + [text for example in card.examples for _, text in example]:
        assert text.strip() and "\n" not in text
    assert load_card(builtin_cards_dir() / f"{key}.toml") == card


def test_library_lists_builtins_and_the_default():
    library = PersonaLibrary()
    assert {"haru", "sam"} <= set(library.keys())
    assert library.get(PersonaLibrary.DEFAULT_KEY).name == "하루"
    assert library.get("sam").name == "Sam"


# -- TOML round trip ----------------------------------------------------------------------------------

def test_dump_and_load_round_trip(tmp_path):
    card = rich_card()
    path = tmp_path / "other-name.toml"
    path.write_text(dump_card(card), encoding="utf-8")
    assert load_card(path) == card


def test_key_defaults_to_the_file_name(tmp_path):
    card = rich_card()
    card.key = ""
    path = tmp_path / "Luna Card.toml"
    path.write_text(dump_card(card), encoding="utf-8")
    assert load_card(path).key == "luna-card"
    assert PersonaLibrary(tmp_path).get("luna-card").name == card.name


def test_render_replaces_macros():
    card = PersonaCard("하루", "{{char}}와 {{USER}}", ["안녕"], [])
    assert card.render("{{char}}: <USER>야, <bot> 왔어 {{ user }}") == "하루: 나야, 하루 왔어 나"
    assert card.render("{{user}}", user="민지") == "민지"


# -- SillyTavern import ---------------------------------------------------------------------------------

def test_import_v2_json(tmp_path):
    path = tmp_path / "Luna Card (v2).json"
    path.write_text(json.dumps(V2_CARD), encoding="utf-8")
    card = import_card(path)
    assert card.name == "Luna" and card.key == "luna-card-v2" and card.language == "en"
    assert card.description == "{{char}} is a sleepy cat who lives with {{user}}.\n\nPersonality: lazy, curious"
    assert card.greetings == ["*yawns* Oh, <USER>, you're back.", "Meow. Food, {{User}}?"]
    assert card.examples == [[("user", "Hi {{char}}!"), ("char", "*stretches* Hi.\nI was napping.")],
                             [("user", "Hungry?"), ("char", "Always.")]]
    assert card.style == "Stay in character."
    assert card.render(card.description) == "Luna is a sleepy cat who lives with You.\n\nPersonality: lazy, curious"
    assert card.render(card.greetings[1], user="Mina") == "Meow. Food, Mina?"
    extra = card.extra
    assert extra["spec"] == "chara_card_v2" and extra["spec_version"] == "2.0"
    assert extra["top_level"] == {"talkativeness": "0.5"}  # the copy of "name" is not kept twice
    assert extra["tags"] == ["cat", "cozy"] and extra["creator"] == "someone" and extra["character_version"] == "1.2"
    assert extra["extensions"]["depth_prompt"] == {"depth": 4, "prompt": "purr"}
    assert extra["character_book"]["entries"][1]["priority"] == 1.5
    assert "scan_depth" not in extra["character_book"]  # JSON null has no TOML form
    # and nothing is lost when the imported card is saved and read again
    assert load_card(PersonaLibrary(tmp_path / "personas").save(card)) == card


def test_import_korean_v1_card(tmp_path):
    path = tmp_path / "민지.json"
    path.write_text(json.dumps({"name": "민지", "description": "{{char}}는 {{user}}의 소꿉친구다.",
                                "personality": "밝고 수다스럽다", "scenario": "방과 후 교실",
                                "first_mes": "야, 같이 가자!", "mes_example": "<START>\n{{user}}: 뭐 해?\n민지: 너 기다렸지!",
                                "avatar": "none"}, ensure_ascii=False), encoding="utf-8")
    card = import_card(path)
    assert card.key == "card" and card.language == "ko" and card.greetings == ["야, 같이 가자!"]
    assert card.description == "{{char}}는 {{user}}의 소꿉친구다.\n\n성격: 밝고 수다스럽다\n\n상황: 방과 후 교실"
    assert card.examples == [[("user", "뭐 해?"), ("char", "너 기다렸지!")]]
    assert card.extra == {"avatar": "none"}
    assert card.render(card.description).startswith("민지는 나의 소꿉친구다.")


def test_import_png_card(tmp_path):
    card = import_card(write_png(tmp_path / "luna.png", {"chara": V2_CARD}))
    assert card.name == "Luna" and card.key == "luna" and len(card.greetings) == 2
    assert card.extra["character_book"]["name"] == "lore"


def test_png_prefers_the_v3_chunk(tmp_path):
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0",
          "data": dict(V2_CARD["data"], name="Luna V3", group_only_greetings=["Hi all"])}
    card = import_card(write_png(tmp_path / "luna.png", {"chara": V2_CARD, "ccv3": v3}))
    assert card.name == "Luna V3" and card.extra["spec"] == "chara_card_v3"
    assert card.extra["group_only_greetings"] == ["Hi all"]


# -- bad input ----------------------------------------------------------------------------------------

GOOD_TOML = 'name = "하루"\ndescription = "친구"\ngreetings = ["안녕"]\n'


@pytest.mark.parametrize("text, message", [
    ('name = "하루"\ndescription = \n', "TOML syntax error"),
    ('description = "친구"\ngreetings = ["안녕"]\n', "missing required field 'name'"),
    ('name = "하루"\ndescription = "친구"\n', "missing required field 'greetings'"),
    ('name = "하루"\ndescription = "친구"\ngreetings = []\n', "at least one greeting"),
    (GOOD_TOML.replace('"친구"', '"  "'), "'description' is empty"),
    (GOOD_TOML.replace('["안녕"]', '["안녕", ""]'), "greeting 2 must be a non-empty string"),
    (GOOD_TOML.replace('"하루"', "3"), "'name' must be a string, not an integer"),
    (GOOD_TOML + 'language = "jp"\n', "'language' must be one of ko, en"),
    (GOOD_TOML + 'greeting = "hi"\n', "unknown field 'greeting'"),
    (GOOD_TOML + '[[examples]]\nturns = [["bot", "hi"]]\n', "example 1, turn 1: speaker must be"),
])
def test_bad_toml_cards(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PersonaError) as err:
        load_card(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_toml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD_TOML + 'style = "unclosed\n', encoding="utf-8")
    with pytest.raises(PersonaError, match="line 4"):
        load_card(path)


def test_missing_file(tmp_path):
    with pytest.raises(PersonaError, match="no such file"):
        load_card(tmp_path / "nope.toml")
    with pytest.raises(PersonaError, match="no such file"):
        import_card(tmp_path / "nope.png")


def test_invalid_utf8(tmp_path):
    toml = tmp_path / "latin.toml"
    toml.write_bytes(GOOD_TOML.replace("하루", "Caf\xe9").encode("latin-1", errors="replace"))
    with pytest.raises(PersonaError, match=r"not valid UTF-8 \(byte 0xe9 at byte offset 11\)"):
        load_card(toml)
    card = tmp_path / "card.json"
    card.write_bytes(b'{"name": "Caf\xe9"}')
    with pytest.raises(PersonaError, match="not valid UTF-8.*offset 13"):
        import_card(card)


def test_too_large_file(tmp_path):
    path = tmp_path / "huge.json"
    with path.open("wb") as f:
        f.truncate(20 * 1024 * 1024 + 1)
    with pytest.raises(PersonaError, match="too large"):
        import_card(path)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must be a JSON object, not an array"),
    ('{"description": "no name", "first_mes": "hi"}', "has no name"),
    ('{"name": "A", "description": "d"}', "no greeting"),
    ('{"name": "A", ', "invalid JSON"),
])
def test_bad_json_cards(tmp_path, content, message):
    path = tmp_path / "card.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PersonaError, match=message):
        import_card(path)


def test_png_without_card_chunk(tmp_path):
    path = write_png(tmp_path / "plain.png", {"Comment": "just a picture"})
    with pytest.raises(PersonaError, match="no 'chara' or 'ccv3'"):
        import_card(path)


@pytest.mark.parametrize("payload, message", [
    ("not*base64!", "not valid base64"),
    (base64.b64encode(b"{oops").decode(), "invalid JSON"),
    (base64.b64encode(b"\xff\xfe").decode(), "not valid UTF-8"),
])
def test_png_with_a_broken_chunk(tmp_path, payload, message):
    path = write_png(tmp_path / "broken.png", {"chara": payload})
    with pytest.raises(PersonaError, match=message) as err:
        import_card(path)
    assert "'chara' chunk" in str(err.value)


# -- library ------------------------------------------------------------------------------------------

def test_user_card_overrides_builtin(tmp_path):
    (tmp_path / "haru.toml").write_text('name = "다른 하루"\ndescription = "d"\ngreetings = ["hi"]\n', "utf-8")
    library = PersonaLibrary(tmp_path)
    assert library.get("haru").name == "다른 하루" and "sam" in library.keys()
    assert PersonaLibrary().get("haru").name == "하루"


def test_unknown_key_lists_available(tmp_path):
    with pytest.raises(PersonaError, match="unknown persona 'nobody'; available: haru, sam"):
        PersonaLibrary(tmp_path / "missing-folder").get("nobody")


def test_corrupt_user_card_is_named(tmp_path):
    (tmp_path / "broken.toml").write_text("name = ", "utf-8")
    library = PersonaLibrary(tmp_path)
    assert "broken" in library.keys()
    with pytest.raises(PersonaError, match="broken.toml: TOML syntax error"):
        library.get("broken")
    assert library.get("sam").name == "Sam"  # the others still load


def test_save_writes_a_card_that_loads_back(tmp_path):
    library = PersonaLibrary(tmp_path / "personas")
    card = rich_card()
    path = library.save(card)
    assert path == tmp_path / "personas" / "haru-2.toml"
    assert library.get("haru-2") == card and "haru-2" in library.keys()
    with pytest.raises(PersonaError, match="may only use"):
        library.save(PersonaCard("X", "d", ["hi"], [], key="My Card"))
    with pytest.raises(PersonaError, match="no folder"):
        PersonaLibrary().save(card)


@pytest.mark.parametrize("card, reason", [
    ({"name": "하루\n나", "first_mes": "안녕", "description": "친구"}, "line break"),
    ({"name": "나: 하루", "first_mes": "안녕", "description": "친구"}, "':'"),
    ({"name": "하루" * 40, "first_mes": "안녕", "description": "친구"}, "at most 64"),
    ({"name": "하루", "first_mes": "안녕", "description": "가" * 2_000_000}, "2,000,000 characters"),
    ({"name": "하루", "first_mes": "안" * 20_000, "description": "친구"}, "greeting 1"),
    ({"name": "하루", "first_mes": "안녕", "description": "친구",
      "mes_example": "<START>\n{{user}}: " + "가" * 20_000 + "\n{{char}}: 응"}, "example dialogues"),
])
def test_hostile_cards_are_refused_with_the_reason(tmp_path, card, reason):
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card, ensure_ascii=False))
    with pytest.raises(PersonaError, match=reason):
        import_card(path)


def test_deeply_nested_cards_are_refused_not_crashed(tmp_path):
    nested = tmp_path / "deep.json"
    nested.write_text('{"name": "하루", "first_mes": "안녕", "description": "친구", "extensions": '
                      + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(PersonaError, match="nested too deeply"):
        import_card(nested)
    toml = tmp_path / "deep.toml"
    toml.write_text('name = "하루"\ndescription = "친구"\ngreetings = ["안녕"]\n[extra]\ndeep = '
                    + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(PersonaError, match="nested too deeply"):
        load_card(toml)
