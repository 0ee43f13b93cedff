"""The nightly rollover job, scheduled with APScheduler inside the running bot.

    nightly = NightlyRollover(settings, store)
    nightly.start()            # in a running asyncio loop: every night at schedule.nightly_time
    await nightly.run_once()   # what the job (and the admin "train now") does

The rollover itself runs in a separate process (`python -m training.rollover`), so chatting goes on
while it trains; the bot picks up a promoted generation on the next message. Never two at once:
the job allows one instance and the rollover process holds a lock file; one that hangs is stopped
after `schedule.max_minutes` and its run marked 'timed out' (admins see it in /status). Misfires: runs missed
while the bot was busy are coalesced into one, and a bot that was down at the scheduled time
catches up once when it starts (when the last run is older than the last scheduled time).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from bot.config import Settings
from bot.store import Store

logger = logging.getLogger(__name__)

JOB_ID = "nightly-rollover"


class NightlyRollover:
    def __init__(self, settings: Settings, store: Store):
        self.settings = settings
        self.store = store
        self.timezone = ZoneInfo(settings.schedule.timezone)
        hour, minute = (int(part) for part in settings.schedule.nightly_time.split(":"))
        self.trigger = CronTrigger(hour=hour, minute=minute, timezone=self.timezone)
        self.scheduler = AsyncIOScheduler(timezone=self.timezone)
        self._running = asyncio.Lock()

    def start(self, now: datetime | None = None) -> None:
        self.scheduler.add_job(self.run_once, self.trigger, id=JOB_ID, max_instances=1, coalesce=True,
                               misfire_grace_time=3600)
        if self.missed(now):
            logger.info("the last nightly rollover was missed; catching up once now")
            self.scheduler.add_job(self.run_once, id=JOB_ID + "-catch-up", max_instances=1)
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def previous_fire_time(self, now: datetime | None = None) -> datetime:
        now = now or datetime.now(self.timezone)
        return self.trigger.get_next_fire_time(None, now - timedelta(days=1))

    def missed(self, now: datetime | None = None) -> bool:
        """True when a rollover ran before but not since the last scheduled time."""
        row = self.store.last_run()
        if row is None:
            return False
        return datetime.fromisoformat(row["started_at"]) < self.previous_fire_time(now)

    async def run_once(self, force: bool = False, lineage: str | None = None) -> tuple[int, str]:
        """Run the rollover process and wait for it; returns (exit code, its verdicts or, on failure, its log's end)."""
        if self._running.locked():
            return 3, "a rollover is already running"
        async with self._running:
            args = [sys.executable, "-m", "training.rollover"] + (["--force"] if force else []) + \
                   (["--lineage", lineage] if lineage else [])
            env = {**os.environ, "BANRYEO_SETTINGS_JSON": self.settings.model_dump_json(
                exclude={"discord_token", "telegram_token", "vllm_api_key"})}
            process = await asyncio.create_subprocess_exec(*args, env=env, stdout=asyncio.subprocess.PIPE,
                                                           stderr=asyncio.subprocess.PIPE)
            try:
                output, log = await asyncio.wait_for(process.communicate(), self.settings.schedule.max_minutes * 60)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
                minutes = self.settings.schedule.max_minutes
                logger.error("the rollover ran longer than schedule.max_minutes (%g) and was stopped", minutes)
                self.store.time_out_runs()  # the lock file died with it; the run's row says what happened
                return 124, f"stopped after {minutes:g} minutes (schedule.max_minutes); the serving generations are unchanged"
            text = output.decode(errors="replace").strip()  # one verdict per lineage (Outcome.line)
            logger.info("rollover exited with %s", process.returncode)
            if process.returncode != 0:  # the log's end says why
                text = (text + "\n" + log.decode(errors="replace")[-1500:]).strip()
            return process.returncode, text
