"""Data that must stay gone: a forget (or `/learning off`) during a night, served copies of a forgotten
user's weights, everything a forget used to leave behind, file modes, and users in backups."""

import asyncio
import json
import os
import stat
import time

import pytest

from bot.cli import main
from bot.engine import UserRef
from bot.generations import lineage_dir
from bot.store import Store
from tests.conftest import write_config
from training.rollover import run_rollover

ALICE = UserRef("test", "alice")
BOB = UserRef("test", "bob")
SECRET = "zebra-7731"
LENIENT = {"min_accuracy": 0.0, "min_gain_over_base": -1.0, "max_drop_from_current": 1.0, "min_distinct2_ratio": 0.0,
           "max_self_bleu_ratio": 100.0, "max_repetition_rate": 1.0, "length_band": (0.0, 100.0),
           "max_kl_per_token": 1e9, "probe_contexts": 2, "samples_per_context": 2}


def lenient(settings, **gate):
    settings.training.min_new_picks = 4
    settings.training.epochs = 1
    settings.training.batch_size = 2
    settings.training.grad_accum = 1
    for key, value in {**LENIENT, **gate}.items():
        setattr(settings.gate, key, value)


async def make_picks(engine, user=ALICE, count=6, text="오늘 뭐 먹지?"):
    for i in range(count):
        offer = await engine.on_message(user, f"{text} {i}")
        if not offer.auto_picked:
            await engine.on_pick(user, offer.id, 0)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("action", ["forget", "learning off"])
async def test_a_forget_or_opt_out_during_a_night_keeps_nothing_it_trained(engine, settings, action):
    lenient(settings, probe_contexts=6, samples_per_context=8)  # a gate long enough to act during it
    await make_picks(engine)
    night = asyncio.get_running_loop().run_in_executor(None, run_rollover, settings)
    folder = lineage_dir(settings, ALICE.id)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".partial-*")) and not night.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if action == "forget":
        await engine.forget(ALICE)
    else:
        await engine.set_learning(ALICE, False)
    assert not night.done(), "the night ended before the user acted: make its gate longer"
    [outcome] = await night

    assert outcome.status == "skipped" and "discarded" in outcome.reason and not outcome.metrics, outcome
    store = engine.store
    assert store.generations(ALICE.id) == [] and store.serving(ALICE.id) is None
    assert not list(folder.glob("gen-*")) and not list(folder.glob(".partial-*"))
    assert (await engine.on_message(ALICE, "아직 있어?")).generation == "base"
    summary = store.db.execute("SELECT summary FROM rollover_runs").fetchone()[0]
    if action == "forget":
        assert ALICE.id not in summary
    else:
        assert store.stats()["picks"] >= 6  # opted out: the picks stay stored, only unused


async def test_forget_evicts_the_served_weights_and_never_reuses_their_name(engine, settings):
    lenient(settings)
    await make_picks(engine)
    [first] = run_rollover(settings)
    assert first.status == "promoted" and first.number == 1
    name = "user-test-alice-gen-1"
    assert (await engine.on_message(ALICE, "1세대야?")).generation == name
    assert name in engine.generator.stats()["resident"] and name in engine.generator.stats()["prefix_adapters"]

    await engine.forget(ALICE)
    stats = engine.generator.stats()
    assert not any(n.startswith("user-test-alice-") for n in stats["resident"] + stats["merged"] +
                   stats["prefix_adapters"]), stats

    await make_picks(engine)  # Alice comes back: her new companion must not be served under the old name
    [again] = run_rollover(settings)
    assert again.status == "promoted" and again.number == 2, again
    assert (await engine.on_message(ALICE, "새로 시작")).generation == "user-test-alice-gen-2"
    await make_picks(engine, BOB)  # a new user starts above every forgotten number too
    bob = [o for o in run_rollover(settings) if o.lineage == BOB.id]
    assert bob[0].number == 2


async def test_forget_leaves_nothing_behind(engine, settings):
    lenient(settings)
    await make_picks(engine, text=SECRET)
    [night] = run_rollover(settings)
    assert night.status == "promoted"
    folder = lineage_dir(settings, ALICE.id)
    (folder / ".partial-gen-0002-4242").mkdir()  # left by a crashed night
    engine.store.set_flag("adapter_error:user-test-alice-gen-1", "adapter_model.safetensors is corrupt")
    settings.training.lineage = "shared"  # the operator switches to one shared companion afterwards
    await make_picks(engine, text=SECRET)
    [shared] = run_rollover(settings)
    assert shared.lineage == "shared" and shared.status == "promoted"
    assert "examples" in engine.store.serving("shared")["metrics"]

    await engine.forget(ALICE)
    store = engine.store
    assert not folder.exists()                                    # partial folders included
    assert store.generations(ALICE.id) == []                      # per-user generations, after the switch too
    assert store.flag("adapter_error:user-test-alice-gen-1") is None
    for (summary,) in store.db.execute("SELECT summary FROM rollover_runs"):
        assert ALICE.id not in summary and "examples" not in summary  # the shared samples may continue her chats
    assert "examples" not in store.serving("shared")["metrics"]
    shared_metadata = lineage_dir(settings, "shared") / "gen-0001" / "metadata.json"
    assert "examples" not in json.loads(shared_metadata.read_text())["metrics"]
    wal = settings.storage.db_path.with_name("banryeo.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0            # truncated: the deleted text is not kept there
    assert SECRET.encode() not in settings.storage.db_path.read_bytes()  # secure_delete overwrote it


async def test_files_and_folders_are_private(engine, settings, tmp_path):
    created = tmp_path / "fresh" / "deeper"
    store = Store(created / "banryeo.db")
    store.set_flag("write", "1")
    assert mode(created) == mode(created.parent) == 0o700
    assert mode(created / "banryeo.db") == 0o600 and mode(created / "banryeo.db-wal") == 0o600
    store.close()
    lenient(settings)
    await make_picks(engine)
    run_rollover(settings)
    assert mode(settings.storage.generations_dir) == mode(lineage_dir(settings, ALICE.id)) == 0o700
    assert mode(lineage_dir(settings, ALICE.id) / "gen-0001") == 0o700


def test_an_existing_folder_keeps_its_mode(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    Store(shared / "banryeo.db").close()
    assert mode(shared) == 0o755 and mode(shared / "banryeo.db") == 0o600


async def test_backups_are_private_expire_and_a_user_can_be_purged_from_them(engine, settings, capsys, tmp_path):
    lenient(settings)
    await make_picks(engine, ALICE, text=SECRET)
    await make_picks(engine, BOB)
    run_rollover(settings)
    config = str(write_config(settings))
    backups = tmp_path / "backups"
    old = backups / "banryeo-20200101-000000"
    old.mkdir(parents=True)
    os.utime(old, (0, 0))
    capsys.readouterr()  # training's own progress lines
    assert main(["--config", config, "backup", str(backups), "--keep-days", "30"]) == 0
    out = capsys.readouterr().out
    folder = backups / out.splitlines()[0].rsplit("/", 1)[-1]
    assert f"expired {old}" in out and not old.exists()
    assert mode(folder) == 0o700 and mode(folder / "banryeo.db") == 0o600
    assert (folder / "generations" / "test-alice" / "gen-0001").exists()

    assert main(["--config", config, "backup", str(backups), "--purge-user", ALICE.id]) == 0
    assert f"{folder}: {ALICE.id} deleted" in capsys.readouterr().out
    copy = Store(folder / "banryeo.db")
    assert copy.user(ALICE.id) is None and copy.generations(ALICE.id) == [] and copy.pick_ids(ALICE.id) == []
    assert copy.user(BOB.id) is not None and copy.generations(BOB.id)  # everybody else is kept
    copy.close()
    assert not (folder / "generations" / "test-alice").exists() and (folder / "generations" / "test-bob").exists()
    assert SECRET.encode() not in (folder / "banryeo.db").read_bytes()
