"""Property-based tests (hypothesis): whatever comes in, the answer is a clear error or a valid result.

Each property names the only exception it accepts; anything else (a crash) fails the test.
"""

import asyncio
import itertools
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from bot.config import ConfigError, load_settings
from bot.engine import EngineError, UserRef
from bot.telegram_bot import parse_button
from persona import PersonaCard, PersonaError, dump_card, import_card, load_card

FAST = hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

texts = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)


# -- the engine API ------------------------------------------------------------------------------------

operation = st.one_of(
    st.tuples(st.just("message"), st.integers(0, 2), st.one_of(texts, st.just(" " * 5), st.just("가" * 20000))),
    st.tuples(st.just("pick"), st.integers(0, 2), st.tuples(st.integers(-3, 3), st.integers(-2, 6))),
    st.tuples(st.just("forged_pick"), st.integers(0, 2), st.text("0123456789abcdefxyz:", max_size=20)),
    st.tuples(st.just("regenerate"), st.integers(0, 2), st.none()),
    st.tuples(st.just("reset"), st.integers(0, 2), st.none()),
    st.tuples(st.just("thumb"), st.integers(0, 2), st.tuples(st.integers(-3, 3), st.integers(-1, 1))),
)
runs = itertools.count()


@FAST
@given(st.lists(operation, min_size=1, max_size=8))
def test_any_sequence_of_engine_calls_keeps_the_store_consistent(engine, settings, ops):
    settings.chat.messages_per_minute = 10_000
    settings.sampling.max_new_tokens = 4
    run = next(runs)
    users = [UserRef("prop", f"{run}-{i}") for i in range(3)]
    offers: list[tuple[UserRef, str]] = []

    async def apply() -> None:
        for kind, who, arg in ops:
            user = users[who]
            try:
                if kind == "message":
                    offer = await engine.on_message(user, arg)
                    offers.append((user, offer.id))
                elif kind == "regenerate":
                    offer = await engine.regenerate(user)
                    offers.append((user, offer.id))
                elif kind == "reset":
                    await engine.reset(user)
                elif kind == "forged_pick":
                    await engine.on_pick(user, arg, 0)
                elif offers:
                    owner, set_id = offers[arg[0] % len(offers)]
                    if kind == "pick":
                        await engine.on_pick(user, set_id, arg[1])
                    else:
                        await engine.on_thumb(user, set_id, arg[1])
            except EngineError:
                pass  # a clear answer for the user; anything else is a bug

    asyncio.run(apply())
    store = engine.store
    for user in users:
        conversation = store.active_conversation(user.id)
        if conversation is None:
            continue
        for turn in store.turns(conversation["id"]):
            if turn["source"] == "picked":  # every reply in the history is a candidate the user picked
                offer = store.candidate_set(turn["candidate_set_id"])
                assert offer["user_id"] == user.id and offer["status"] == "picked"
                assert store.pick_of(offer["id"])["text"] == turn["text"]
    for row in store.db.query("SELECT p.user_id, s.user_id AS owner FROM picks p JOIN candidate_sets s "
                              "ON s.id = p.set_id"):
        assert row["user_id"] == row["owner"]  # nobody ever picks from someone else's offer
    for row in store.db.query("SELECT set_id, count(*) AS n FROM picks GROUP BY set_id"):
        assert row["n"] == 1  # never two picks for one offer
    open_sets = store.db.execute("SELECT user_id, count(*) FROM candidate_sets WHERE status = 'open' "
                                 "GROUP BY user_id").fetchall()
    assert all(count == 1 for _, count in open_sets)  # at most one offer open per user


# -- button data ---------------------------------------------------------------------------------------

@FAST
@given(st.one_of(texts, st.from_regex(r"(pick|regen|thumb|forget):[0-9a-f:a-z]{0,20}(:[0-9]{1,3}|:up|:yes)?",
                                      fullmatch=True)))
def test_any_button_data_parses_to_a_known_button_or_none(data):
    button = parse_button(data)
    if button is not None:
        assert button.action in {"pick", "regen", "thumb", "forget"}
        rebuilt = ":".join(part for part in (button.action, button.target, button.value) if part)
        assert rebuilt == data
        if button.action == "pick":
            assert 0 <= int(button.value) < 100


# -- persona cards ---------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=20)
card_like = st.fixed_dictionaries({}, optional={
    "spec": st.sampled_from(["chara_card_v2", "chara_card_v3", "other"]) | texts,
    "data": st.fixed_dictionaries({}, optional={"name": texts | json_values, "description": texts | json_values,
                                                "first_mes": texts | json_values, "mes_example": texts,
                                                "alternate_greetings": json_values, "extensions": json_values}),
    "name": texts, "first_mes": texts})


@FAST
@given(st.one_of(card_like, json_values))
def test_any_json_card_imports_or_is_refused_clearly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("card") / "card.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    try:
        card = import_card(path)
    except PersonaError as exc:
        assert str(exc)
        return
    assert isinstance(card, PersonaCard) and card.name.strip() and card.greetings
    saved = path.with_suffix(".toml")  # whatever was imported can be written and read back
    saved.write_text(dump_card(card), encoding="utf-8")
    again = load_card(saved)
    assert (again.name, again.greetings) == (card.name, card.greetings)


@FAST
@given(st.binary(max_size=400))
def test_any_bytes_as_a_card_file_are_refused_clearly(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("raw")
    for name in ("card.json", "card.png", "card.toml"):
        (folder / name).write_bytes(raw)
        try:
            import_card(folder / name) if name != "card.toml" else load_card(folder / name)
        except PersonaError:
            pass


# -- configuration ---------------------------------------------------------------------------------------

fields = st.sampled_from(["SAMPLING__TEMPERATURE", "SAMPLING__CANDIDATES", "CHAT__PERSONA", "SCHEDULE__TIMEZONE",
                          "SCHEDULE__NIGHTLY_TIME", "SERVING__MAX_ADAPTERS", "MODEL__DTYPE", "GATE__LENGTH_BAND",
                          "TELEGRAM__WEBHOOK_URL", "ADMINS", "TRAINING__LINEAGE"])


@FAST
@given(st.dictionaries(fields, st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=20),
                       max_size=4))
def test_any_environment_values_give_settings_or_a_clear_config_error(monkeypatch, values):
    with monkeypatch.context() as patched:
        for field, value in values.items():
            patched.setenv(f"BANRYEO_{field}", value)
        try:
            settings = load_settings()
        except ConfigError as exc:
            assert str(exc).startswith("invalid configuration")
            return
    assert 1 <= settings.sampling.candidates <= 5


@FAST
@given(texts)
def test_any_config_file_text_gives_settings_or_a_clear_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("config") / "banryeo.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_settings(path)
    except ConfigError as exc:
        assert str(exc)


@pytest.fixture(autouse=True)
def _no_stray_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("BANRYEO_"):
            monkeypatch.delenv(name)
