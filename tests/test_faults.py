"""Faults: the process is killed (SIGKILL) while sampling, while writing picks and while promoting; the
database is busy. After a restart nothing stored is lost or doubled and the served generation is whole.
(A kill in the middle of training is in test_rollover.py.)
"""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from bot.engine import DialogueEngine, UserRef
from bot.store import Store
from persona import PersonaLibrary

ROOT = Path(__file__).resolve().parents[1]
ALICE = UserRef("test", "alice")

DRIVER = """
import asyncio, sys
from bot.config import load_settings
from bot.cli import build_engine
from bot.engine import UserRef
from bot.generations import promote

async def chat(engine, endless):
    i = 0
    while True:
        for who in ("alice", "bob"):
            user = UserRef("test", who)
            offer = await engine.on_message(user, f"message {i}")
            print("offered", flush=True)
            if not offer.auto_picked:
                await engine.on_pick(user, offer.id, i % len(offer.texts))
        i += 1
        if not endless:
            return

mode = sys.argv[1]
settings = load_settings()
if mode == "promote":
    from bot.store import Store
    store = Store(settings.storage.db_path)
    print("promoting", flush=True)
    while True:
        for number in (1, 2, None):
            promote(store, "test:alice", number)
else:
    engine = build_engine(settings)
    asyncio.run(chat(engine, endless=mode == "picks"))
"""


def start_driver(mode: str, settings, **env) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "BANRYEO_STORAGE__DATA_DIR": str(settings.storage.data_dir),
                   "BANRYEO_MODEL__NAME": settings.model.name, "BANRYEO_MODEL__DTYPE": "float32",
                   "BANRYEO_MODEL__PROMPT_FORMAT": "transcript", "BANRYEO_CHAT__MESSAGES_PER_MINUTE": "100000",
                   **env}
    environment.pop("BANRYEO_SETTINGS_JSON", None)
    return subprocess.Popen([sys.executable, "-c", DRIVER, mode], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=settings.storage.data_dir.parent)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def check_consistent(store: Store) -> None:
    db = store.db
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for row in db.query("SELECT s.id, s.status, count(p.id) AS picks FROM candidate_sets s "
                        "LEFT JOIN picks p ON p.set_id = s.id GROUP BY s.id"):
        assert row["picks"] == (1 if row["status"] == "picked" else 0), row  # a pick and its set agree
    orphans = db.execute("SELECT count(*) FROM turns t WHERE t.source = 'picked' AND NOT EXISTS "
                         "(SELECT 1 FROM picks p WHERE p.turn_id = t.id)").fetchone()[0]
    assert orphans == 0  # no picked reply without its pick, and (UNIQUE) no pick twice


async def test_killed_while_sampling_keeps_the_message_and_it_can_be_answered_after_restart(settings, tiny_backend):
    process = start_driver("once", settings, BANRYEO_SAMPLING__MIN_NEW_TOKENS="1000",
                           BANRYEO_SAMPLING__MAX_NEW_TOKENS="1000")
    store = Store(settings.storage.db_path)
    deadline = time.monotonic() + 120
    while not store.db.execute("SELECT count(*) FROM turns WHERE role = 'user'").fetchone()[0]:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    # Sampling starts as soon as the message is stored; 3 x 1000 tokens of the tiny model took 0.5 s on a
    # fast machine (the next message, Bob's, then appeared), so the kill comes well inside it.
    time.sleep(0.05)
    kill(process)
    check_consistent(store)
    assert [r[0] for r in store.db.execute("SELECT text FROM turns WHERE role = 'user'")] == ["message 0"]
    assert store.stats()["candidate_sets"] == 0  # nothing half-written

    settings.chat.messages_per_minute = 100
    engine = DialogueEngine(store, tiny_backend, PersonaLibrary(), settings)  # the restart
    try:
        offer = await engine.regenerate(ALICE)  # the unanswered message gets its candidates now
        assert offer.texts and store.candidate_set(offer.id)["user_turn_id"] == \
            store.db.execute("SELECT id FROM turns WHERE role = 'user'").fetchone()[0]
    finally:
        engine.close()


def test_killed_while_writing_picks_loses_and_doubles_nothing(settings):
    process = start_driver("picks", settings, BANRYEO_SAMPLING__MAX_NEW_TOKENS="2")
    offered = 0
    for line in process.stdout:  # let it write a good number of picks, then kill it mid-stream
        offered += line.startswith("offered")
        if offered >= 12:
            break
    kill(process)
    store = Store(settings.storage.db_path)
    check_consistent(store)
    assert store.stats()["picks"] >= 10


def test_killed_while_promoting_always_leaves_a_whole_generation_serving(settings, store):
    folders = []
    for number in (1, 2):
        folder = settings.storage.generations_dir / "test-alice" / f"gen-{number:04d}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        folders.append(folder)
        parent = store.generations("test:alice")[-1]["id"] if number == 2 else None
        store.add_generation("test:alice", number, str(folder), parent, "promoted", {}, 0)
    for _ in range(3):
        process = start_driver("promote", settings)
        assert process.stdout.readline().startswith("promoting")
        time.sleep(0.3)
        kill(process)
        serving = Store(settings.storage.db_path).serving("test:alice")
        assert serving is None or Path(serving["path"]) in folders and (Path(serving["path"]) /
                                                                         "adapter_config.json").exists()


async def test_a_busy_database_is_waited_for_not_failed(engine, settings):
    blocker = sqlite3.connect(settings.storage.db_path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock for a second
    blocker.execute("INSERT INTO flags (name, value) VALUES ('maintenance', '1')")
    threading.Timer(1.0, lambda: blocker.execute("COMMIT")).start()
    started = time.monotonic()
    offer = await engine.on_message(ALICE, "잠겨 있어도 돼?")
    assert offer.texts and time.monotonic() - started >= 0.9
    assert engine.store.flag("maintenance") == "1"
    blocker.close()
