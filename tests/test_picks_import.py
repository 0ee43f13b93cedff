"""`banryeo picks import`: pick records made elsewhere, stored exactly as live picks, all or nothing."""

import io
import json
import sqlite3
import sys

import pytest

from bot.cli import main
from bot.config import ModelSettings
from bot.engine import UserRef
from bot.picks_import import (ImportRules, ImportSummary, PickImportError, import_pick_records, load_prompt_backend,
                              read_pick_lines)
from bot.prompt import Turn, build_prompt
from persona import PersonaLibrary
from training.dataset import plan_night

ALICE = "test:alice"
BOB = "test:bob"


def record(user: str = ALICE, **changes) -> dict:
    base = {"user": user,
            "context": [{"role": "assistant", "content": "왔구나~ 오늘 하루는 어땠어?"},
                        {"role": "user", "content": "배고파 저녁 뭐 먹지?"}],
            "chosen": "라면 어때?", "rejected": ["나도 배고파", "밥은 먹었어?"]}
    return {**base, **changes}


def jsonl(*records: dict) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def row_counts(store) -> dict[str, int]:
    tables = [r["name"] for r in store.db.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {table: store.db[table].count for table in tables}


def expected_prompt(settings, count_tokens, rec: dict, persona: str = "haru", chat_template=None):
    turns = [Turn("user" if m["role"] == "user" else "char", m["content"]) for m in rec["context"]]
    return build_prompt(PersonaLibrary(settings.storage.persona_dir).get(persona), turns, count_tokens=count_tokens,
                        budget=settings.chat.max_context_tokens, chat_template=chat_template)


def write_config(settings):
    path = settings.storage.data_dir / "banryeo.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[storage]\ndata_dir = "{settings.storage.data_dir}"\n'
                    f'[model]\nname = "{settings.model.name}"\nprompt_format = "transcript"\n')
    return path


# -- storing ------------------------------------------------------------------------------------------


def test_records_become_ordinary_picks_with_the_prompt_a_live_message_gets(settings, store, tiny_backend):
    records = [record(), record(persona="sam", chosen="Ramen?", rejected=["No idea", "Eat rice", "Sleep"]),
               record(BOB, chosen="치킨!", rejected=["피자!"])]
    summary = import_pick_records(store, settings, records, tiny_backend.count_tokens)
    assert summary == ImportSummary(picks=3, users=2)

    stored = list(store.preference_records(ALICE))
    assert [(r["chosen"], sorted(r["rejected"])) for r in stored] == [
        ("라면 어때?", ["나도 배고파", "밥은 먹었어?"]), ("Ramen?", ["Eat rice", "No idea", "Sleep"])]
    for rec, got, persona in zip(records, stored, ["haru", "sam"]):
        prompt = expected_prompt(settings, tiny_backend.count_tokens, rec, persona)
        assert got["prompt"] == prompt.text and got["context"] == prompt.messages
        assert got["generation"] == "imported" and got["sampling"] == {}
        offer = store.candidate_set(got["set_id"])
        assert offer["persona"] == persona and offer["model"] == "imported" and offer["status"] == "picked"
        assert offer["prompt_tokens"] == prompt.tokens and offer["dropped_turns"] == prompt.dropped_turns
    [bob] = store.preference_records(BOB)
    assert (bob["chosen"], bob["rejected"]) == ("치킨!", ["피자!"])

    # Shuffled by content: the chosen reply is not always first, and the same records give the same order.
    order = [store.pick_of(r["set_id"])["idx"] for r in store.preference_records()]
    assert set(order) != {0}
    import_pick_records(store, settings, records, tiny_backend.count_tokens)
    assert [store.pick_of(r["set_id"])["idx"] for r in store.preference_records()][3:] == order

    # The dialogue is stored as turns of an ended conversation; the pick added the chosen reply.
    users = {u: store.user(u) for u in (ALICE, BOB)}
    assert users[ALICE]["platform"] == "test" and users[ALICE]["platform_user_id"] == "alice"
    assert users[ALICE]["persona"] == "haru"  # a new user gets the default persona, whatever the records say
    offer = store.candidate_set(stored[0]["set_id"])
    turns = store.turns(offer["conversation_id"])
    assert [(t["role"], t["source"], t["text"]) for t in turns] == [
        ("char", "greeting", "왔구나~ 오늘 하루는 어땠어?"), ("user", "typed", "배고파 저녁 뭐 먹지?"),
        ("char", "picked", "라면 어때?")]
    assert offer["user_turn_id"] == turns[1]["id"] and store.active_conversation(ALICE) is None
    assert store.db["picks"].count == 6 and store.db["picks"].count_where("auto = 1") == 0


async def test_the_prompt_is_the_one_the_engine_built_for_the_same_dialogue(engine, settings, store, tiny_backend):
    settings.chat.max_context_tokens = 760   # the persona and a few turns: older turns are dropped
    settings.chat.max_message_chars = 50     # and the long message is shortened
    alice = UserRef("test", "alice")
    for text in ["안녕! 오늘 하루 어땠어?", "회사에서 발표했는데 떨렸어 " * 6, "주말에 뭐 해? 강아지 산책 가자!",
                 "저녁 뭐 먹지? 라면 어때?"]:
        offer = await engine.on_message(alice, text)
        if not offer.auto_picked:
            await engine.on_pick(alice, offer.id, 0)
    live = store.candidate_set(offer.id)
    turns = [t for t in store.turns(live["conversation_id"]) if t["id"] <= live["user_turn_id"]]
    context = [{"role": "user" if t["role"] == "user" else "assistant", "content": t["text"]} for t in turns]

    import_pick_records(store, settings, [record(BOB, context=context)], tiny_backend.count_tokens)
    [imported] = store.preference_records(BOB)
    copy = store.candidate_set(imported["set_id"])
    assert live["dropped_turns"] > 0
    for key in ("prompt", "context_json", "prompt_tokens", "dropped_turns", "persona"):
        assert copy[key] == live[key], key


def test_a_given_prompt_and_time_are_kept(settings, store, tiny_backend):
    given = "아무 형식의 프롬프트\n하루:"
    rec = record(prompt=given, created_at="2024-05-01T21:30:00+09:00", chosen="줄바꿈이\n  있는 답", rejected=["a\tb"])
    import_pick_records(store, settings, [rec], tiny_backend.count_tokens)
    [got] = store.preference_records(ALICE)
    assert got["prompt"] == given and got["picked_at"] == "2024-05-01T12:30:00.000+00:00"
    assert (got["chosen"], got["rejected"]) == ("줄바꿈이 있는 답", ["a b"])  # replies are one line, as sampled
    offer = store.candidate_set(got["set_id"])
    assert offer["prompt_tokens"] == tiny_backend.count_tokens(given)
    assert offer["context_json"] == json.dumps(expected_prompt(settings, tiny_backend.count_tokens, rec).messages,
                                               ensure_ascii=False)
    stamps = {t["created_at"] for t in store.turns(offer["conversation_id"])}
    assert stamps == {offer["created_at"], offer["closed_at"], got["picked_at"]}


def test_chat_models_get_their_chat_template(settings, store, tiny_chat_model_dir):
    backend = load_prompt_backend(ModelSettings(name=str(tiny_chat_model_dir)))
    assert backend.use_chat_template and backend.model is None
    import_pick_records(store, settings, [record()], backend.count_tokens, chat_template=backend.chat_prompt)
    [got] = store.preference_records(ALICE)
    prompt = expected_prompt(settings, backend.count_tokens, record(), chat_template=backend.chat_prompt)
    assert got["prompt"] == prompt.text and "<|assistant|>" in got["prompt"]


async def test_a_live_conversation_is_left_alone(engine, settings, store, tiny_backend):
    alice = UserRef("test", "alice")
    offer = await engine.on_message(alice, "배고파")
    conversation = store.active_conversation(alice.id)
    store.update_user(alice.id, persona="sam")
    settings.chat.messages_per_minute = 1  # rate limits are for live chat only
    import_pick_records(store, settings, [record(), record(), record()], tiny_backend.count_tokens)
    assert store.active_conversation(alice.id) == conversation
    assert store.candidate_set(offer.id)["status"] == ("picked" if offer.auto_picked else "open")
    imported = [store.candidate_set(r["set_id"]) for r in store.preference_records(alice.id)
                if r["generation"] == "imported"]
    assert len(imported) == 3 and {o["persona"] for o in imported} == {"sam"}  # the user's own persona


def test_imported_picks_are_training_pairs(settings, store, tiny_backend):
    records = [record(chosen=f"답 {n}", rejected=[f"다른 답 {n}"]) for n in range(6)]
    import_pick_records(store, settings, records, tiny_backend.count_tokens)
    data = plan_night(store, [ALICE], settings.training)
    pairs = data.train_pairs + data.heldout_pairs
    assert data.picks == 6 and sorted((p["chosen"], p["rejected"]) for p in pairs) == [
        (f"답 {n}", f"다른 답 {n}") for n in range(6)]


# -- refusing ------------------------------------------------------------------------------------------


BAD_LINES = [
    ('{"user": "telegram:1", "context": [}', "not JSON (Expecting value at column 36)"),
    ("[1, 2]", "a pick record must be a JSON object, not a list"),
    (json.dumps({**record(), "chosen": "a", "chosen ": "b"}), "unknown key 'chosen '"),
    ('{"user": "a:1", "user": "a:2"}', "key 'user' appears twice"),
    (json.dumps({k: v for k, v in record().items() if k != "rejected"}), "missing 'rejected'"),
    (json.dumps(record(user="telegram 5")), "'user' must be \"platform:id\""),
    (json.dumps(record(user="telegram:")), "'user' must be \"platform:id\""),
    (json.dumps(record(context=[])), "'context' must be a non-empty list"),
    (json.dumps(record(context=[{"role": "user"}])), "context message 1 must be an object with just"),
    (json.dumps(record(context=[{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])),
     "context message 1: 'role' must be \"user\" or \"assistant\" (got \"system\")"),
    (json.dumps(record(context=[{"role": "user", "content": "  "}])), "context message 1 is empty"),
    (json.dumps(record(context=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])),
     "the last context message must be the user's"),
    (json.dumps(record(context=[{"role": "user", "content": "x" * 8001}])),
     "context message 1 is too long (8001 characters; at most 8000)"),
    (json.dumps(record(chosen=" \n ")), "'chosen' is empty"),
    (json.dumps(record(chosen=3)), "'chosen' must be a text, not a number"),
    (json.dumps(record(rejected=[])), "'rejected' must be a list of 1 to 9 texts"),
    (json.dumps(record(rejected=[str(n) for n in range(10)])), "'rejected' must be a list of 1 to 9 texts"),
    (json.dumps(record(rejected="no")), "'rejected' must be a list of 1 to 9 texts"),
    (json.dumps(record(rejected=["ok", ""])), "rejected text 2 is empty"),
    (json.dumps(record(rejected=[" 라면\n어때? "])), "rejected text 1 is the same as 'chosen'"),
    (json.dumps(record(rejected=["a", "b", "a "])), "rejected text 3 repeats rejected text 1"),
    (json.dumps(record(persona="nobody")), "unknown persona 'nobody' (known: haru, sam)"),
    (json.dumps(record(prompt="")), "'prompt' must be a non-empty text"),
    (json.dumps(record(created_at="yesterday")), "'created_at' must be an ISO-8601 time"),
    (json.dumps(record(created_at="2024-05-01T21:30:00")), "'created_at' needs a time zone"),
]


def test_every_bad_line_is_named_and_nothing_is_stored(settings, store, tiny_backend):
    lines = ["# picks from the old bot", "", jsonl(record()).strip()] + [line for line, _ in BAD_LINES]
    with pytest.raises(PickImportError) as caught:
        read_pick_lines(lines, ImportRules.of(store, settings))
    errors = caught.value.errors
    assert len(errors) == len(BAD_LINES)
    for number, ((_, message), error) in enumerate(zip(BAD_LINES, errors), 4):
        assert error.startswith(f"line {number}: {message}"), (error, message)

    before = row_counts(store)
    good_and_bad = [record(), record(rejected=[]), record(BOB, chosen=""), record()]
    with pytest.raises(PickImportError) as caught:
        import_pick_records(store, settings, good_and_bad, tiny_backend.count_tokens)
    assert caught.value.errors == ["line 2: 'rejected' must be a list of 1 to 9 texts", "line 3: 'chosen' is empty"]
    assert row_counts(store) == before


def test_one_line_can_have_several_problems_and_an_empty_file_is_an_error(settings, store, tiny_backend):
    assert validate_all({"user": 5, "chosen": "", "extra": 1}) == [
        "line 1: unknown key 'extra' (known: user, context, chosen, rejected, persona, prompt, created_at)",
        "line 1: missing 'context'", "line 1: missing 'rejected'",
        "line 1: 'user' must be \"platform:id\", e.g. \"telegram:123456\" (got 5)", "line 1: 'chosen' is empty"]
    with pytest.raises(PickImportError, match="no pick records in picks.jsonl"):
        read_pick_lines(["# nothing yet", "  "], source="picks.jsonl")
    with pytest.raises(PickImportError, match="no pick records"):
        import_pick_records(store, settings, [], tiny_backend.count_tokens)


def validate_all(rec: dict) -> list[str]:
    with pytest.raises(PickImportError) as caught:
        read_pick_lines([json.dumps(rec)])
    return caught.value.errors


def test_users_who_turned_learning_off_are_refused(settings, store, tiny_backend):
    store.ensure_user(BOB, "test", "bob", "", "haru")
    store.update_user(BOB, learning_opt_out=1)
    before = row_counts(store)
    with pytest.raises(PickImportError) as caught:
        import_pick_records(store, settings, [record(), record(BOB), record(BOB)], tiny_backend.count_tokens)
    assert caught.value.errors == [f"line {n}: user '{BOB}' has turned learning off; their picks are not imported"
                                   for n in (2, 3)]
    assert row_counts(store) == before


def test_a_failure_while_storing_leaves_the_database_as_it_was(settings, store, tiny_backend):
    import_pick_records(store, settings, [record(BOB)], tiny_backend.count_tokens)
    before = row_counts(store)
    # The database refuses the second pick of this import, after the first one and its user were written.
    store.db.execute("CREATE TRIGGER second_pick_fails BEFORE INSERT ON picks WHEN (SELECT count(*) FROM picks) >= 2 "
                     "BEGIN SELECT RAISE(ABORT, 'disk full, say'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        import_pick_records(store, settings, [record(), record("test:carol")], tiny_backend.count_tokens)
    assert row_counts(store) == before and store.user(ALICE) is None and not store.db.conn.in_transaction

    store.db.execute("DROP TRIGGER second_pick_fails")

    def tokenizer_fails_on_the_third_record(text: str) -> int:
        if text == "세 번째":
            raise RuntimeError("tokenizer crashed")
        return tiny_backend.count_tokens(text)

    records = [record(), record(chosen="두 번째"), record(chosen="세 번째"), record()]
    with pytest.raises(RuntimeError):
        import_pick_records(store, settings, records, tokenizer_fails_on_the_third_record)
    assert row_counts(store) == before


# -- the command -----------------------------------------------------------------------------------------


def test_the_command_imports_a_file_and_prints_a_summary(settings, store, tmp_path, capsys):
    path = tmp_path / "picks.jsonl"
    path.write_text("# exported from the old bot\n" + jsonl(record(), record(BOB), record(BOB)), encoding="utf-8")
    config = ["--config", str(write_config(settings))]

    assert main(config + ["picks", "import", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would import 3 picks for 2 users" in out and "test:bob" in out and "2 picks" in out
    assert store.db["picks"].count == 0

    assert main(config + ["picks", "import", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "imported 3 picks for 2 users"
    assert [r["chosen"] for r in store.preference_records()] == ["라면 어때?"] * 3


def test_the_command_names_every_bad_line_and_stores_nothing(settings, store, tmp_path, capsys, monkeypatch):
    config = ["--config", str(write_config(settings))]
    path = tmp_path / "picks.jsonl"
    path.write_text(jsonl(record(), record(rejected=["라면 어때?"])) + "{oops\n", encoding="utf-8")
    assert main(config + ["picks", "import", str(path)]) == 1
    err = capsys.readouterr().err
    assert "line 2: rejected text 1 is the same as 'chosen'" in err
    assert "line 3: not JSON (Expecting property name enclosed in double quotes at column 2)" in err
    assert f"nothing imported from {path}" in err and "Traceback" not in err
    assert store.db["picks"].count == 0 and store.db["users"].count == 0

    path.write_bytes(jsonl(record()).encode() + b'{"user": "caf\xe9"}\n')
    assert main(config + ["picks", "import", str(path)]) == 1
    assert "line 2: not valid UTF-8 (byte 0xe9)" in capsys.readouterr().err
    assert main(config + ["picks", "import", str(tmp_path / "missing.jsonl")]) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"# only a comment\n")))
    assert main(config + ["picks", "import", "-"]) == 1
    assert "no pick records in standard input" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(jsonl(record()).encode())))
    assert main(config + ["picks", "import", "-"]) == 0
    assert capsys.readouterr().out.strip() == "imported 1 pick for 1 user"
