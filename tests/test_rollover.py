"""The nightly rollover on the tiny model: training, gate, generations, promotion, rollback, crashes."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.engine import UserRef
from bot.generations import lineage_dir, rollback
from tests.conftest import LENIENT, STRICT, configure, make_picks, nights
from training.rollover import EXIT_BUSY, RolloverBusy, rollover_lock, run_rollover

ALICE = UserRef("test", "alice")
ROOT = Path(__file__).resolve().parents[1]
async def test_a_passed_gate_promotes_and_the_engine_serves_it_without_restart(engine, settings, tiny_backend):
    configure(settings, LENIENT)
    await make_picks(engine)
    before = await engine.on_message(ALICE, "전")
    assert before.generation == "base"

    [outcome] = run_rollover(settings)
    assert outcome.status == "promoted" and outcome.number == 1, outcome
    folder = lineage_dir(settings, ALICE.id) / "gen-0001"
    metadata = json.loads((folder / "metadata.json").read_text())
    assert (folder / "adapter_config.json").exists() and metadata["parent"] is None
    assert metadata["metrics"]["train_pairs"] > 0 and "distinct2_base" in metadata["metrics"]
    assert not list(folder.parent.glob(".partial-*"))

    after = await engine.on_message(ALICE, "후")  # same process, same engine: hot reload
    assert after.generation == "user-test-alice-gen-1"
    assert engine.store.candidate_set(after.id)["generation"] == "user-test-alice-gen-1"

    # nothing new to learn from: the next night skips
    [again] = run_rollover(settings)
    assert again.status == "skipped" and "new picks" in again.reason


async def test_a_reply_in_flight_finishes_on_the_generation_it_started_with(engine, settings):
    await nights(engine, settings, LENIENT, LENIENT)
    rollback(engine.store, ALICE.id, 1)
    assert (await engine.on_message(ALICE, "1세대")).generation == "user-test-alice-gen-1"
    engine.generator.backend.lock.acquire()  # the model is busy; the next reply waits with its generation chosen
    try:
        in_flight = asyncio.create_task(engine.on_message(ALICE, "도중에"))
        await asyncio.sleep(0.2)
        rollback(engine.store, ALICE.id, 2)  # promoted while that reply waits
    finally:
        engine.generator.backend.lock.release()
    assert (await in_flight).generation == "user-test-alice-gen-1"
    assert (await engine.on_message(ALICE, "다음")).generation == "user-test-alice-gen-2"
    statuses = [s["status"] for s in engine.store.db.query("SELECT status FROM candidate_sets ORDER BY rowid")]
    assert statuses[-3:] == ["skipped", "skipped", "open"]  # each message answered once


async def test_a_failed_gate_keeps_the_serving_generation_and_records_why(engine, settings):
    _, outcome = await nights(engine, settings, LENIENT, STRICT)
    assert outcome.status == "rejected" and "does not beat the base" in outcome.reason
    rows = engine.store.generations(ALICE.id)
    assert [(g["number"], g["status"]) for g in rows] == [(1, "promoted"), (2, "rejected")]
    assert rows[1]["parent_id"] == rows[0]["id"] and "beat the base" in rows[1]["reason"]
    assert engine.store.serving(ALICE.id)["number"] == 1
    offer = await engine.on_message(ALICE, "여전히 1세대?")
    assert offer.generation == "user-test-alice-gen-1"


async def test_rollback_and_promote_by_number(engine, settings):
    await nights(engine, settings, LENIENT, LENIENT)
    store = engine.store
    assert store.serving(ALICE.id)["number"] == 2
    assert rollback(store, ALICE.id)["number"] == 1         # default: the parent
    assert (await engine.on_message(ALICE, "롤백")).generation == "user-test-alice-gen-1"
    assert rollback(store, ALICE.id, 2)["number"] == 2
    assert rollback(store, ALICE.id, None)["number"] == 1   # 2 -> its parent 1
    assert rollback(store, ALICE.id) is None                 # 1 has no parent: the base model
    assert (await engine.on_message(ALICE, "베이스")).generation == "base"
    with pytest.raises(ValueError, match="base model"):
        rollback(store, ALICE.id)
    with pytest.raises(ValueError, match="no generation 9"):
        rollback(store, ALICE.id, 9)


async def test_per_user_lineages_learn_only_from_their_own_picks(engine, settings):
    configure(settings, LENIENT)
    bob = UserRef("test", "bob")
    await make_picks(engine, ALICE)
    await make_picks(engine, bob)
    outcomes = {o.lineage: o for o in run_rollover(settings)}
    assert set(outcomes) == {ALICE.id, bob.id}
    alice_gen = engine.store.serving(ALICE.id)
    bob_gen = engine.store.serving(bob.id)
    alice_picks = len([r for r in engine.store.preference_records(ALICE.id)])
    assert alice_gen["metrics"]["picks"] == alice_picks
    assert alice_gen["path"] != bob_gen["path"]
    assert (await engine.on_message(bob, "안녕")).generation == "user-test-bob-gen-1"


async def test_shared_lineage_learns_from_everybody(engine, settings):
    configure(settings, LENIENT)
    settings.training.lineage = "shared"
    await make_picks(engine, ALICE, 3)
    await make_picks(engine, UserRef("test", "bob"), 3)
    [outcome] = run_rollover(settings)
    assert outcome.lineage == "shared" and outcome.status == "promoted"
    assert (await engine.on_message(ALICE, "같이")).generation == "user-shared-gen-1"

    await make_picks(engine, ALICE, 4)
    [second] = run_rollover(settings)
    assert second.metrics["warm_start"]  # nights continue the shared adapter...
    await engine.forget(UserRef("test", "bob"))
    [third] = run_rollover(settings)  # ...until someone forgets: what Bob taught must not live on in it
    assert third.status == "promoted" and not third.metrics["warm_start"], third
    alice_picks = len(engine.store.pick_ids(ALICE.id))  # all of Alice's picks are new to it, none of Bob's remain
    assert third.metrics["picks"] == third.metrics["new_picks"] == alice_picks == len(engine.store.pick_ids())
    await make_picks(engine, ALICE, 4)
    assert run_rollover(settings)[0].metrics["warm_start"]


def test_a_second_rollover_while_one_runs_exits_at_once(settings):
    with rollover_lock(settings):
        with pytest.raises(RolloverBusy):
            run_rollover(settings)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "training.rollover"], cwd=ROOT, capture_output=True,
                                env=_env(settings), timeout=120)
        assert result.returncode == EXIT_BUSY and b"already running" in result.stderr
        assert time.monotonic() - started < 60


async def test_a_crash_mid_training_leaves_the_previous_generation_serving(engine, settings):
    configure(settings, LENIENT)
    await make_picks(engine)
    run_rollover(settings)
    await make_picks(engine)
    slow = {"training": {**settings.training.model_dump(), "epochs": 400}}
    proc = subprocess.Popen([sys.executable, "-m", "training.rollover"], cwd=ROOT, env=_env(settings, slow),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    folder = lineage_dir(settings, ALICE.id)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert [p.name for p in folder.glob("gen-*")] == ["gen-0001"]        # nothing half-written is visible
    assert engine.store.serving(ALICE.id)["number"] == 1
    assert (await engine.on_message(ALICE, "살아있어?")).generation == "user-test-alice-gen-1"
    [outcome] = run_rollover(settings)                                     # the next night recovers
    assert outcome.number == 2 and not list(folder.glob(".partial-*"))
    runs = list(engine.store.db.query("SELECT status FROM rollover_runs ORDER BY id"))
    assert [r["status"] for r in runs] == ["finished", "running", "finished"]  # the killed run stays visible


def _env(settings, overrides=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANRYEO_")}
    data = json.loads(settings.model_dump_json(exclude={"discord_token", "telegram_token", "vllm_api_key"}))
    data.update(overrides or {})
    env["BANRYEO_SETTINGS_JSON"] = json.dumps(data)
    env["PYTHONPATH"] = str(ROOT)
    return env


async def test_paused_learning_trains_nothing_and_forget_removes_the_users_generations(engine, settings):
    from bot.admin import Admin

    await nights(engine, settings, LENIENT)
    admin = Admin(engine.store, settings)
    admin.pause_learning(True)
    await make_picks(engine)
    [outcome] = run_rollover(settings)
    assert outcome.status == "skipped" and outcome.reason == "learning is paused"
    admin.pause_learning(False)
    assert not admin.learning_paused()

    folder = Path(engine.store.serving(ALICE.id)["path"])
    assert folder.exists()
    exported = await engine.export(ALICE)
    assert exported["user"]["id"] == ALICE.id and exported["conversations"][0]["candidate_sets"]
    await engine.forget(ALICE)
    assert not folder.exists() and engine.store.serving(ALICE.id) is None
    assert engine.store.generations(ALICE.id) == [] and list(engine.store.preference_records(ALICE.id)) == []
    assert (await engine.export(ALICE))["user"] is None
    [after] = run_rollover(settings) or [None]  # nothing of Alice's is left to train on
    assert after is None or after.status == "skipped"
