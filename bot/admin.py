"""Admin operations, shared by every platform's admin commands and the CLI.

    admin = Admin(store, settings)
    admin.is_admin("discord:1234")
    admin.status() / admin.generations(lineage) / admin.learned(lineage) / admin.stats()
    admin.promote(lineage, 3) / admin.rollback(lineage) / await admin.train_now()

Platforms check `is_admin` before calling anything else here.
"""

from __future__ import annotations

import json
from pathlib import Path

from bot.config import Settings
from bot.generations import promote, rollback
from bot.messages import render
from bot.store import Store
from schedules.nightly import NightlyRollover
from training.chart import plot_generations

COMPARED = ("accuracy", "accuracy_base", "distinct2", "self_bleu", "length", "kl_per_token")


class Admin:
    def __init__(self, store: Store, settings: Settings, nightly: NightlyRollover | None = None):
        self.store = store
        self.settings = settings
        # the scheduled job, or (schedule off) the same job that only admins trigger
        self.nightly = nightly or NightlyRollover(settings, store)

    def is_admin(self, user_id: str) -> bool:
        return user_id in self.settings.admins

    def status(self) -> dict:
        last = self.store.last_run()
        serving = self.store.serving_pointers()
        next_run = None
        if self.nightly.scheduler.running:
            job = self.nightly.scheduler.get_job("nightly-rollover")
            next_run = job.next_run_time.isoformat() if job and job.next_run_time else None
        return {"model": self.settings.model.name, "lineage_mode": self.settings.training.lineage,
                "learning_paused": self.learning_paused(),
                "serving": {lineage: self._label(gid) for lineage, gid in serving.items()},
                "last_rollover": last, "next_rollover": next_run,
                "adapter_errors": self.store.adapter_errors(),
                **self.store.stats()}

    def status_text(self) -> str:
        """`status()` as the few lines the platforms' /status command shows."""
        status = self.status()
        lines = [f"model: {status['model']} ({status['lineage_mode']})",
                 f"serving: {status['serving'] or 'base'}",
                 f"learning paused: {status['learning_paused']}",
                 *night_lines(status["last_rollover"]),
                 f"picks {status['picks']}, users {status['users']}, generations {status['generations']}",
                 *(f"adapter error {name}: {error}" for name, error in status["adapter_errors"].items())]
        return "\n".join(lines)

    def generations(self, lineage: str) -> list[dict]:
        return self.store.generations(lineage)

    def learned(self, lineage: str) -> dict:
        """The serving generation's metrics next to its parent's (or the base's, measured the same night)."""
        serving = self.store.serving(lineage)
        if serving is None:
            return {"lineage": lineage, "serving": "base"}
        parent = self.store.generation(serving["parent_id"]) if serving["parent_id"] else None
        rows = {}
        for key in COMPARED:
            before = parent["metrics"].get(key) if parent else serving["metrics"].get(f"{key}_base")
            rows[key] = (before, serving["metrics"].get(key))
        return {"lineage": lineage, "serving": serving["number"], "compared_with": parent["number"] if parent else "base",
                "metrics": rows, "examples": serving["metrics"].get("examples", [])}

    def promote(self, lineage: str, number: int | None) -> str:
        generation = promote(self.store, lineage, number)
        return self._label(generation["id"] if generation else None)

    def rollback(self, lineage: str, number: int | None = None) -> str:
        generation = rollback(self.store, lineage, number)
        return self._label(generation["id"] if generation else None)

    async def train_now(self, lineage: str | None = None) -> tuple[int, str]:
        """Run the rollover process now (even with few new picks); returns (exit code, its output)."""
        return await self.nightly.run_once(force=True, lineage=lineage)

    async def train_now_text(self, language: str | None, lineage: str | None = None) -> str:
        """`train_now`, told as the admin commands tell it: each lineage's verdict, figures and reasons."""
        code, output = await self.train_now(lineage)
        if code == 0:
            return render("training_finished", language, result=output or "-")
        return render("training_failed", language, code=code, result=output)

    def chart(self, lineage: str, path: Path) -> Path:
        return plot_generations(self.store.generations(lineage), lineage, path)

    def pause_learning(self, paused: bool) -> None:
        """While paused, nightly and manual rollovers train nothing; chatting and picks go on."""
        self.store.set_flag("learning_paused", "1" if paused else None)

    def learning_paused(self) -> bool:
        return self.store.flag("learning_paused") is not None

    def stats(self) -> dict:
        return self.store.stats()

    def _label(self, generation_id: int | None) -> str:
        if generation_id is None:
            return "base"
        g = self.store.generation(generation_id)
        return f"gen-{g['number']}"


def night_lines(run: dict | None, failures_shown: int = 5) -> list[str]:
    """The last (or running) night for /status: its progress over the lineages it trains, and its failures."""
    if run is None:
        return ["last rollover: -"]
    when = f"running since {run['started_at']}" if run["status"] == "running" else \
        f"{run['status']} at {run.get('finished_at') or run['started_at']}"
    total, done = run.get("lineages_total") or 0, run.get("lineages_done") or 0
    counts = [f"{done}/{total} lineages done"] if total else []
    if run.get("lineages_failed"):
        counts.append(f"{run['lineages_failed']} failed")
    if run.get("retries"):
        counts.append(f"{run['retries']} retried")
    lines = [f"last rollover: {when} ({run.get('executor', 'local')})" + (": " + ", ".join(counts) if counts else "")]
    try:
        outcomes = json.loads(run.get("summary") or "[]")
    except ValueError:
        outcomes = []
    failed = [o for o in outcomes if isinstance(o, dict) and o.get("status") == "failed"]
    lines += [f"  failed {o['lineage']}: {o.get('reason', '')}" for o in failed[:failures_shown]]
    if len(failed) > failures_shown:
        lines.append(f"  ... and {len(failed) - failures_shown} more failed")
    return lines
