"""Online backups: a consistent database copy taken while the bot writes, plus generations and personas."""

import sqlite3
import threading

from bot.cli import main
from bot.engine import UserRef
from tests.conftest import write_config

ALICE = UserRef("test", "alice")


async def test_backup_while_writing_is_consistent_and_complete(engine, settings, capsys, tmp_path):
    offer = await engine.on_message(ALICE, "백업 전에 한마디")
    await engine.on_pick(ALICE, offer.id, 0)
    data = settings.storage.data_dir
    (data / "generations" / "test-alice" / "gen-0001").mkdir(parents=True)
    (data / "generations" / "test-alice" / "gen-0001" / "adapter_config.json").write_text("{}")
    (data / "generations" / "test-alice" / ".partial-gen-0002-99").mkdir()  # a run in progress

    stop = threading.Event()

    def keep_writing():  # another connection writes all the time, as a running bot would
        writer = sqlite3.connect(settings.storage.db_path, timeout=30)
        while not stop.is_set():
            writer.execute("INSERT OR REPLACE INTO flags (name, value) VALUES ('tick', datetime('now'))")
            writer.commit()
        writer.close()

    thread = threading.Thread(target=keep_writing)
    thread.start()
    try:
        assert main(["--config", str(write_config(settings)), "backup", str(tmp_path / "backups")]) == 0
    finally:
        stop.set()
        thread.join()
    folder = tmp_path / "backups" / capsys.readouterr().out.strip().rsplit("/", 1)[-1]
    copy = sqlite3.connect(folder / "banryeo.db")
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT count(*) FROM picks").fetchone()[0] == 1
    assert copy.execute("SELECT text FROM turns WHERE role = 'user'").fetchone()[0] == "백업 전에 한마디"
    assert (folder / "generations" / "test-alice" / "gen-0001" / "adapter_config.json").exists()
    assert not (folder / "generations" / "test-alice" / ".partial-gen-0002-99").exists()
    assert not list(folder.parent.glob("*.partial"))
