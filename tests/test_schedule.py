"""The nightly job: schedule, catch-up after downtime, the real rollover process, no overlap."""

import asyncio
import json
from datetime import datetime
from zoneinfo import ZoneInfo

from bot.admin import Admin
from bot.engine import UserRef
from schedules.nightly import JOB_ID, NightlyRollover
from tests.conftest import LENIENT, configure, make_picks

SEOUL = ZoneInfo("Asia/Seoul")


def test_fires_at_the_configured_local_time(settings, store):
    settings.schedule.nightly_time = "04:30"
    nightly = NightlyRollover(settings, store)
    now = datetime(2026, 11, 24, 12, 0, tzinfo=SEOUL)
    upcoming = nightly.trigger.get_next_fire_time(None, now)
    assert upcoming == datetime(2026, 11, 25, 4, 30, tzinfo=SEOUL)
    assert nightly.previous_fire_time(now) == datetime(2026, 11, 24, 4, 30, tzinfo=SEOUL)


def test_a_missed_night_is_caught_up_once(settings, store):
    nightly = NightlyRollover(settings, store)
    now = datetime(2026, 11, 24, 9, 0, tzinfo=SEOUL)
    assert not nightly.missed(now)  # never ran: nothing to catch up
    store.db["rollover_runs"].insert({"started_at": "2026-11-22T19:00:00+00:00", "status": "finished"})
    assert nightly.missed(now)      # last run 23 Nov 04:00 KST, so 24 Nov 04:00 was missed
    store.db["rollover_runs"].insert({"started_at": "2026-11-23T19:05:00+00:00", "status": "finished"})
    assert not nightly.missed(now)  # ran at 04:05 KST today


async def test_start_schedules_the_job_and_one_catch_up(settings, store):
    store.db["rollover_runs"].insert({"started_at": "2020-01-01T00:00:00+00:00", "status": "finished"})
    nightly = NightlyRollover(settings, store)
    nightly.run_once = _noop  # the catch-up itself is tested below with the real process
    nightly.start()
    try:
        ids = sorted(job.id for job in nightly.scheduler.get_jobs())
        assert ids == [JOB_ID, JOB_ID + "-catch-up"]
        job = nightly.scheduler.get_job(JOB_ID)
        assert job.max_instances == 1 and job.coalesce
    finally:
        nightly.shutdown()


async def _noop(*args, **kwargs):
    return 0, ""


async def test_the_real_job_trains_and_the_running_engine_picks_it_up(engine, settings):
    configure(settings, LENIENT)
    alice = UserRef("test", "alice")
    await make_picks(engine, alice)
    nightly = NightlyRollover(settings, engine.store)
    admin = Admin(engine.store, settings, nightly)
    first, second = await asyncio.gather(nightly.run_once(), admin.train_now())  # the job and "train now"
    assert sorted([first[0], second[0]]) == [0, 3], (first, second)  # never two at once
    output = first[1] if first[0] == 0 else second[1]
    assert f"{alice.id}: promoted gen-1" in output
    offer = await engine.on_message(alice, "새 세대?")
    assert offer.generation == "user-test-alice-gen-1"
    runs = list(engine.store.db.query("SELECT status, summary FROM rollover_runs"))
    assert [r["status"] for r in runs] == ["finished"]
    assert json.loads(runs[0]["summary"])[0]["status"] == "promoted"


async def test_a_hung_rollover_is_stopped_and_admins_see_it(engine, settings):
    configure(settings, LENIENT)
    settings.training.epochs = 10_000  # far longer than the limit below
    settings.schedule.max_minutes = 0.75
    alice = UserRef("test", "alice")
    await make_picks(engine, alice)
    nightly = NightlyRollover(settings, engine.store)
    admin = Admin(engine.store, settings, nightly)
    code, text = await nightly.run_once()
    assert code == 124 and "stopped after 0.75 minutes" in text
    [run] = engine.store.db.query("SELECT status, finished_at FROM rollover_runs")
    assert run["status"] == "timed out" and run["finished_at"]
    assert "last rollover: timed out at" in admin.status_text()
    assert engine.store.serving(alice.id) is None  # nothing half-done is served
    settings.training.epochs, settings.schedule.max_minutes = 1, 30
    code, text = await nightly.run_once()  # the next night is not blocked by the lock file
    assert code == 0 and f"{alice.id}: promoted gen-1" in text, text
