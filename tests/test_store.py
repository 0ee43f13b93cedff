"""The SQLite store: schema, migrations, atomic picks, reactions, feedback records."""

import sqlite3

import pytest

from bot.store import MIGRATIONS, Store, StoreError


def make_set(store, user_id="test:u", texts=("가", "나", "다")):
    store.ensure_user(user_id, "test", user_id.split(":")[1], "", "haru")
    conversation = store.start_conversation(user_id, "haru", "안녕")
    turn = store.add_turn(conversation, user_id, "user", "배고파", "typed")
    set_id = store.add_candidate_set(
        conversation_id=conversation, user_id=user_id, user_turn_id=turn, persona="haru", prompt="…\n하루:",
        context=[{"role": "user", "content": "배고파"}], prompt_tokens=5, dropped_turns=0, model="tiny",
        generation="base", sampling={"temperature": 0.9},
        candidates=[{"text": t, "new_tokens": 3, "hit_stop": True} for t in texts])
    return store.candidate_set(set_id)


def test_schema_is_created_in_wal_mode_and_reopening_keeps_data(tmp_path):
    path = tmp_path / "b.db"
    store = Store(path)
    assert store.schema_version == len(MIGRATIONS)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    make_set(store)
    store.close()
    again = Store(path)
    assert again.stats()["candidate_sets"] == 1
    assert again.schema_version == len(MIGRATIONS)


def test_newer_schema_and_corrupt_files_are_refused_clearly(tmp_path):
    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(newer)
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(corrupt)


def test_pick_is_atomic_and_only_once(tmp_path):
    store = Store(tmp_path / "b.db")
    offer = make_set(store)
    turn_id = store.record_pick(offer, 1)
    assert store.turn(turn_id)["text"] == "나"
    assert store.candidate_set(offer["id"])["status"] == "picked"
    turns_before = store.stats()["turns"]
    with pytest.raises(sqlite3.IntegrityError):
        store.record_pick(offer, 2)
    assert store.stats()["turns"] == turns_before  # the failed pick left no reply turn behind
    assert store.pick_of(offer["id"])["idx"] == 1


def test_pick_on_a_closed_set_rolls_back(tmp_path):
    store = Store(tmp_path / "b.db")
    offer = make_set(store)
    store.close_open_sets("test:u", "skipped")
    before = store.stats()
    with pytest.raises(sqlite3.IntegrityError):
        store.record_pick(offer, 0)
    assert store.stats() == before


def test_reactions_replace_earlier_ones(tmp_path):
    store = Store(tmp_path / "b.db")
    offer = make_set(store)
    turn_id = store.record_pick(offer, 0)
    store.set_reaction("test:u", turn_id, 1, "👍")
    store.set_reaction("test:u", turn_id, -1, "👎")
    rows = list(store.db.query("SELECT value, emoji FROM reactions"))
    assert rows == [{"value": -1, "emoji": "👎"}]


def test_preference_records_per_user(tmp_path):
    store = Store(tmp_path / "b.db")
    store.record_pick(make_set(store, "test:a", ("a1", "a2", "a3")), 0)
    store.record_pick(make_set(store, "test:b", ("b1", "b2")), 1)
    records = list(store.preference_records())
    assert [(r["user_id"], r["chosen"], r["rejected"]) for r in records] == [
        ("test:a", "a1", ["a2", "a3"]), ("test:b", "b2", ["b1"])]
    assert [r["chosen"] for r in store.preference_records("test:b")] == ["b2"]
    assert records[0]["sampling"] == {"temperature": 0.9} and records[0]["generation"] == "base"
