"""The nightly rollover: for each lineage with enough new picks, train a generation, gate it, promote it.

    python -m training.rollover                 # every lineage that has enough new picks
    python -m training.rollover --force         # ignore the minimum of new picks
    python -m training.rollover --lineage discord:1234

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
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bot.config import Settings, load_settings
from bot.generations import RETRAIN_FROM_BASE, SHARED, adapter_name, lineage_dir, next_number, prune
from bot.model import ModelBackend
from bot.store import Store, now, private_dir
from training.dataset import plan_night
from training.gate import GateReport, evaluate, pair_wins, verdict
from training.train import train_adapter

logger = logging.getLogger(__name__)

EXIT_BUSY = 3


class RolloverBusy(Exception):
    """Another rollover holds the lock."""


@dataclass
class Outcome:
    lineage: str
    status: str            # promoted | rejected | skipped
    reason: str = ""
    number: int | None = None
    metrics: dict | None = None

    def line(self) -> str:
        """What `banryeo train` prints and the admin commands tell: the decision, its figures, its reasons."""
        head = f"{self.lineage}: {self.status}" + (f" gen-{self.number}" if self.number else "")
        if self.metrics is None or "accuracy" not in self.metrics:
            return head + (f" ({self.reason})" if self.reason else "")
        text = f"{head} - {verdict(self.status, self.metrics).partition(': ')[2]}"
        return text + (f"\n  refused: {self.reason}" if self.reason else "")


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (with `files`) and the folder itself to disk."""
    for path in sorted(folder.rglob("*")) if files else []:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
    """Train, gate and maybe promote each lineage; the previous generation keeps serving on any failure."""
    with rollover_lock(settings):
        store = Store(settings.storage.db_path)
        run_id = store.start_run()
        outcomes: list[Outcome] = []
        try:
            paused = store.flag("learning_paused")
            for lineage, users in lineages(store, settings).items():
                if only is not None and lineage != only:
                    continue
                outcome = Outcome(lineage, "skipped", "learning is paused") if paused else \
                    _skip_reason(store, settings, lineage, users, force)
                if outcome is None:
                    trainable = "auto" if settings.model.dtype == "int8" else settings.model.dtype  # int8 serves only
                    backend = backend or ModelBackend.load(settings.model.model_copy(
                        update={"adapter": None, "dtype": trainable}))
                    outcome = _roll(store, settings, backend, lineage, users)
                logger.info("%s: %s %s", lineage, outcome.status, outcome.reason)
                outcomes.append(outcome)
            status = "finished"
        except BaseException:
            status = "failed"
            raise
        finally:
            gone = {o.lineage for o in outcomes if o.lineage != SHARED and store.user(o.lineage) is None}
            summary = json.dumps([o.__dict__ for o in outcomes if o.lineage not in gone], ensure_ascii=False,
                                 default=str)
            store.finish_run(run_id, status, summary)
            store.close()
        return outcomes


def _skip_reason(store: Store, settings: Settings, lineage: str, users, force: bool) -> Outcome | None:
    if store.flag(RETRAIN_FROM_BASE + lineage) is not None:  # someone forgot: retrain even with no new picks
        return None
    history = store.generations(lineage)
    after = max((g["last_pick_id"] for g in history), default=0)
    new = sum(1 for user in (users or [None]) for i in store.pick_ids(user) if i > after)
    if new == 0 or (new < settings.training.min_new_picks and not force):
        return Outcome(lineage, "skipped", f"{new} new picks (needs {settings.training.min_new_picks})")
    return None


def _roll(store: Store, settings: Settings, backend: ModelBackend, lineage: str, users) -> Outcome:
    cfg = settings.training
    current = store.serving(lineage)
    number = next_number(store, settings, lineage)
    # After a user of a shared lineage forgot their data, its adapter still holds what they taught:
    # the night starts from the base on the remaining picks instead of continuing it.
    retrain = store.flag(RETRAIN_FROM_BASE + lineage)
    start = None if retrain else current
    data = plan_night(store, users, cfg, start, _heldout_of(start), night=number)
    if not data.train_pairs or not data.heldout_pairs:
        return Outcome(lineage, "skipped", f"{data.new_picks} new picks are too few for a training and a held-out "
                                           "part")
    train_pairs, known = data.train_pairs, {}
    if start is not None:  # a warm night learns only what the serving generation does not know yet
        train_pairs, known = _unknown_pairs(backend, data, adapter_name(start), Path(start["path"]))
        if len(train_pairs) < cfg.batch_size * cfg.grad_accum:
            return Outcome(lineage, "skipped", f"nothing new to learn: the serving generation already prefers the "
                                               f"picked reply in {sum(known.values())} of {len(known)} pairs")
    folder = lineage_dir(settings, lineage)
    private_dir(folder)
    for stale in folder.glob(".partial-*"):  # left by a crash: never visible, safe to remove
        shutil.rmtree(stale, ignore_errors=True)
    partial = folder / f".partial-gen-{number:04d}-{os.getpid()}"
    private_dir(partial)  # the adapter folder, like every data folder, is this user's only

    result = train_adapter(backend, train_pairs, data.thumbs, cfg, partial,
                           max_reply_tokens=settings.sampling.max_new_tokens,
                           start_from=Path(start["path"]) if start else None)
    backend.load_adapter("candidate", partial)
    current_name = None
    if current is not None:
        current_name = adapter_name(current)
        backend.load_adapter(current_name, Path(current["path"]))
    report: GateReport = evaluate(backend, data.heldout_pairs, "candidate", current_name, settings.gate,
                                  settings.sampling, data.train_pairs)
    if start is not None:  # every new pick, tested once by the generation that had not learned it
        heldout_wins = report.metrics["accuracy_current"] * len(data.heldout_pairs)  # scored by the gate
        new_wins = [known[id(p)] for p in data.new_train_pairs]
        report.metrics["serving_accuracy_on_new"] = (sum(new_wins) + heldout_wins) / (len(new_wins) +
                                                                                      len(data.heldout_pairs))
        report.metrics["serving_tested_pairs"] = len(new_wins) + len(data.heldout_pairs)
        report.metrics["known_pairs"] = sum(known.values())
    backend.model = backend.model.unload()  # back to the plain base for the next lineage

    metrics = {**result.metrics, **report.metrics, "train_pairs": result.pairs, "thumbs": result.thumbs,
               "planned_pairs": len(data.train_pairs),
               "picks": data.picks, "new_picks": data.new_picks, "replay_pairs": data.replay_pairs}
    metadata = {
        "lineage": lineage, "number": number, "parent": current["number"] if current else None,
        "created_at": now(), "base_model": settings.model.name, "last_pick_id": data.last_pick_id,
        "training": cfg.model_dump(), "gate": settings.gate.model_dump(), "passed": report.passed,
        "reasons": report.reasons, "metrics": metrics, "heldout_pick_ids": data.heldout_pick_ids,
    }
    (partial / "metadata.json").write_text(json.dumps(metadata, ensure_ascii=False, indent=2, default=str))
    shutil.rmtree(partial / "trainer", ignore_errors=True)
    final = folder / f"gen-{number:04d}"
    fsync_tree(partial)  # on disk before it becomes visible: a power cut cannot leave a named, empty adapter
    partial.rename(final)  # atomic: the generation appears whole or not at all
    fsync_tree(folder, files=False)

    status = "promoted" if report.passed else "rejected"
    used_picks = [p["pick_id"] for p in data.train_pairs + data.heldout_pairs]
    contributors = {p["user_id"] for p in data.train_pairs + data.heldout_pairs} | {t["user_id"] for t in data.thumbs}
    contributors.discard(None)
    with store.transaction():  # promoted only if nobody forgot or opted out while it trained
        kept = store.learnable(used_picks, contributors) and store.flag(RETRAIN_FROM_BASE + lineage) == retrain
        if kept:
            generation_id = store.add_generation(lineage, number, str(final), current["id"] if current else None,
                                                 status, metrics, data.last_pick_id, "; ".join(report.reasons))
            if report.passed:
                store.set_serving(lineage, generation_id)
                if retrain:  # nobody forgot since this night began (checked above)
                    store.set_flag(RETRAIN_FROM_BASE + lineage, None)
    if not kept:
        shutil.rmtree(final, ignore_errors=True)
        logger.info("%s: generation %d discarded, a user forgot their data or stopped learning meanwhile",
                    lineage, number)
        return Outcome(lineage, "skipped", "discarded: a user whose picks it learned from deleted their data or "
                                           "turned learning off while it trained")
    prune(store, settings, lineage)
    return Outcome(lineage, status, "; ".join(report.reasons), number, metrics)


def _unknown_pairs(backend: ModelBackend, data, name: str, path: Path) -> tuple[list[dict], dict[int, bool]]:
    """Tonight's training pairs the serving generation does not win yet, and for every pair (by id) whether
    it does. Pushing pairs it already wins would only move it further the same way (a learned fact
    creeping into every reply); a lesson it has forgotten comes back through the replay sample."""
    backend.load_adapter(name, path)
    wins = pair_wins(backend, data.train_pairs, name)
    backend.model = backend.model.unload()  # training starts from the plain base
    return [p for p, won in zip(data.train_pairs, wins) if not won], \
        {id(p): won for p, won in zip(data.train_pairs, wins)}


def _heldout_of(generation: dict | None) -> list[int]:
    """The picks a generation held out for its gate (untrained: the next night learns them)."""
    if generation is None:
        return []
    metadata = Path(generation["path"]) / "metadata.json"
    return json.loads(metadata.read_text()).get("heldout_pick_ids", []) if metadata.exists() else []


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
