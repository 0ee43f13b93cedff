"""The nightly rollover: for each lineage with enough new picks, train a generation, gate it, promote it.

    python -m training.rollover                 # every lineage that has enough new picks
    python -m training.rollover --force         # ignore the minimum of new picks
    python -m training.rollover --lineage discord:1234

This process plans the night (which lineages have enough new picks, and each one's data: see
training/dataset.py), hands each lineage's train+gate job to an executor (training/ray_jobs.py: in
this process one after another, or on a Ray cluster several at once), and records results as they
arrive: the generation's row, and the serving pointer when its gate passed. A job that fails, or
whose worker is lost, is run once more (`training.retries`); if it fails again only its lineage is
recorded as failed and keeps serving its previous generation. Admins follow the night in /status:
lineages done of the night's total, failures and retries (the rollover_runs row, updated as results
arrive).

A warm night (one that continues the serving generation) first scores tonight's pairs with it and
trains only those it does not win yet; with fewer than one optimizer step of them, the night is
skipped and its picks wait for the next one.

A generation is an immutable folder `<data_dir>/generations/<lineage>/gen-0007/` holding the LoRA
adapter and `metadata.json` (data range, settings, metrics, parent), plus a row in SQLite. Numbers
only grow. The folder is written under a temporary name and renamed into place, so a crash never
leaves a half-written generation visible; the serving pointer changes in one transaction, only
after a passed gate. Only one rollover runs at a time (a lock file); a second one exits at once.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from collections import deque
from dataclasses import replace
from pathlib import Path

from bot.config import Settings, load_settings
from bot.generations import RETRAIN_FROM_BASE, SHARED
from bot.model import ModelBackend
from bot.store import Store, private_dir
from training.lineage_job import Outcome, plan_job, record
from training.ray_jobs import LocalJobs, RayJobs, describe_failure

logger = logging.getLogger(__name__)

EXIT_BUSY = 3


class RolloverBusy(Exception):
    """Another rollover holds the lock."""


@contextmanager
def rollover_lock(settings: Settings):
    private_dir(settings.storage.generations_dir)
    with open(settings.storage.generations_dir / ".rollover.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RolloverBusy("a rollover is already running") from None
        yield


def lineages(store: Store, settings: Settings) -> dict[str, list[str] | None]:
    """Lineage -> the users whose picks train it (None: everybody, for the shared lineage)."""
    if settings.training.lineage == "shared":
        return {SHARED: None}
    return {user: [user] for user in store.users_with_picks()}


def run_rollover(settings: Settings, only: str | None = None, force: bool = False,
                 backend: ModelBackend | None = None) -> list[Outcome]:
    """Train, gate and maybe promote each lineage; the previous generation keeps serving on any failure.

    `backend` (the local executor only) is a loaded base model to train on instead of loading one."""
    with rollover_lock(settings):
        store = Store(settings.storage.db_path)
        run_id = store.start_run(settings.training.executor)
        outcomes: list[Outcome] = []
        status = "failed"
        try:
            to_train = _to_train(store, settings, only, force, outcomes)
            _progress(store, run_id, outcomes, to_train, retries=0)
            if to_train:
                _run_jobs(store, settings, run_id, to_train, outcomes, backend)
            status = "finished"
        finally:
            store.finish_run(run_id, status, _summary(store, outcomes))
            store.close()
        return outcomes


def _to_train(store: Store, settings: Settings, only: str | None, force: bool,
              outcomes: list[Outcome]) -> dict[str, list[str] | None]:
    """Tonight's lineages with enough new picks (lineage -> its users); the others get their outcome here."""
    paused = store.flag("learning_paused")
    chosen = {}
    for lineage, users in lineages(store, settings).items():
        if only is not None and lineage != only:
            continue
        skipped = Outcome(lineage, "skipped", "learning is paused") if paused else \
            _skip_reason(store, settings, lineage, users, force)
        if skipped is None:
            chosen[lineage] = users
        else:
            logger.info("%s: %s %s", lineage, skipped.status, skipped.reason)
            outcomes.append(skipped)
    return chosen


def _run_jobs(store: Store, settings: Settings, run_id: int, to_train: dict[str, list[str] | None],
              outcomes: list[Outcome], backend: ModelBackend | None) -> None:
    """Plan each lineage's job shortly before the executor has room for it (a few at a time, so a night of
    many users holds only a few nights' data, and each reads the newest picks), record every result as it
    arrives, and run a failed job once more."""
    executor = RayJobs(settings) if settings.training.executor == "ray" else LocalJobs(settings, backend)
    waiting = deque(to_train.items())
    retries = 0

    def finish(outcome: Outcome) -> None:
        logger.info("%s: %s %s", outcome.lineage, outcome.status, outcome.reason)
        outcomes.append(outcome)
        _progress(store, run_id, outcomes, to_train, retries)

    def fill() -> None:
        while waiting and executor.pending < executor.room:
            job = plan_job(store, settings, *waiting.popleft())
            if isinstance(job, Outcome):  # too few picks for a training and a held-out part
                finish(job)
            else:
                executor.submit(job)

    try:
        fill()
        while executor.pending:
            job, result = executor.next_finished()
            if isinstance(result, BaseException):
                why = describe_failure(result)
                if job.attempt < settings.training.retries:
                    logger.warning("%s: attempt %d failed (%s); trying again", job.lineage, job.attempt + 1, why)
                    executor.submit(replace(job, attempt=job.attempt + 1))
                    retries += 1
                    _progress(store, run_id, outcomes, to_train, retries)
                    continue
                finish(Outcome(job.lineage, "failed", why, attempts=job.attempt + 1))
            else:
                finish(record(store, settings, job, result))
            fill()
    finally:
        executor.close()


def _progress(store: Store, run_id: int, outcomes: list[Outcome], to_train: dict, retries: int) -> None:
    done = [o for o in outcomes if o.lineage in to_train]
    store.run_progress(run_id, _summary(store, outcomes), lineages_total=len(to_train), lineages_done=len(done),
                       lineages_failed=sum(o.status == "failed" for o in done), retries=retries)


def _summary(store: Store, outcomes: list[Outcome]) -> str:
    """The run's outcomes as JSON, without lineages whose user has forgotten their data meanwhile."""
    gone = {o.lineage for o in outcomes if o.lineage != SHARED and store.user(o.lineage) is None}
    return json.dumps([o.__dict__ for o in outcomes if o.lineage not in gone], ensure_ascii=False, default=str)


def _skip_reason(store: Store, settings: Settings, lineage: str, users, force: bool) -> Outcome | None:
    if store.flag(RETRAIN_FROM_BASE + lineage) is not None:  # someone forgot: retrain even with no new picks
        return None
    history = store.generations(lineage)
    after = max((g["last_pick_id"] for g in history), default=0)
    new = sum(1 for user in (users or [None]) for i in store.pick_ids(user) if i > after)
    if new == 0 or (new < settings.training.min_new_picks and not force):
        return Outcome(lineage, "skipped", f"{new} new picks (needs {settings.training.min_new_picks})")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train, gate and promote LoRA generations from picks.")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--lineage", help="only this lineage (a user id like discord:1234, or 'shared')")
    parser.add_argument("--force", action="store_true", help="train even with fewer new picks than the minimum")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = json.loads(os.environ.get("BANRYEO_SETTINGS_JSON", "{}"))
    settings = load_settings(args.config, **overrides)
    started = time.perf_counter()
    try:
        outcomes = run_rollover(settings, args.lineage, args.force)
    except RolloverBusy as exc:
        print(f"banryeo: {exc}", file=sys.stderr)
        return EXIT_BUSY
    for outcome in outcomes:
        print(outcome.line())
    logger.info("rollover finished in %.0fs", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
