"""One lineage's night as a self-contained job: train a generation on planned data, gate it, write its folder.

    job = plan_job(store, settings, lineage, users)      # the bot's side: reads SQLite, decides the data
    result = train_and_gate(job, backend)                # anywhere: needs the base model and the shared folder
    outcome = record(store, settings, job, result)       # the bot's side: promote in SQLite, or not

The job carries everything the training side needs (the planned pairs, the generation it continues,
the settings), so it can run in the rollover process (`training.executor = "local"`) or on any Ray
worker (`"ray"`, training/ray_jobs.py) that sees `storage.data_dir`'s generations folder. Workers
never open the database: only the rollover process reads picks and changes the serving pointer.

The worker writes the generation under a temporary name and renames it into place, so a worker that
dies never leaves a half-written generation visible; a folder with no database row is never served
and a retry of the same job replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bot.config import Settings
from bot.generations import RETRAIN_FROM_BASE, adapter_name, lineage_dir, next_number, prune
from bot.model import ModelBackend
from bot.store import Store, now, private_dir
from training.dataset import PreferenceData, plan_night
from training.gate import GateReport, evaluate, pair_wins, verdict
from training.train import train_adapter

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    lineage: str
    status: str            # promoted | rejected | skipped | failed
    reason: str = ""
    number: int | None = None
    metrics: dict | None = None
    attempts: int = 1      # how many times its job ran (a failed or lost worker is retried)

    def line(self) -> str:
        """What `banryeo train` prints and the admin commands tell: the decision, its figures, its reasons."""
        head = f"{self.lineage}: {self.status}" + (f" gen-{self.number}" if self.number else "")
        if self.attempts > 1:
            head += f" (attempt {self.attempts})"
        if self.metrics is None or "accuracy" not in self.metrics:
            return head + (f" ({self.reason})" if self.reason else "")
        text = f"{head} - {verdict(self.status, self.metrics).partition(': ')[2]}"
        return text + (f"\n  refused: {self.reason}" if self.reason else "")


@dataclass
class LineageJob:
    """Tonight's work for one lineage, planned by the rollover process."""

    lineage: str
    number: int                           # the generation it writes: gen-<number>
    data: PreferenceData
    settings: Settings                    # without secrets: it travels to workers
    start: dict | None = None             # the generation it continues (None: from the base)
    retrain: str | None = None            # the retrain-from-base flag it was planned under
    attempt: int = 0                      # 0 the first time, 1 for its retry


@dataclass
class JobResult:
    """What a worker sends back: a generation written to the shared folder, or why none was."""

    status: str                           # trained | skipped
    reason: str = ""
    path: str | None = None
    passed: bool = False
    metrics: dict = field(default_factory=dict)


def plan_job(store: Store, settings: Settings, lineage: str, users: list[str] | None) -> LineageJob | Outcome:
    """Read tonight's data for a lineage; an Outcome (skipped) when there is too little of it."""
    current = store.serving(lineage)
    number = next_number(store, settings, lineage)
    # After a user of a shared lineage forgot their data, its adapter still holds what they taught:
    # the night starts from the base on the remaining picks instead of continuing it.
    retrain = store.flag(RETRAIN_FROM_BASE + lineage)
    start = None if retrain else current
    data = plan_night(store, users, settings.training, start, _heldout_of(start), night=number)
    if not data.train_pairs or not data.heldout_pairs:
        return Outcome(lineage, "skipped", f"{data.new_picks} new picks are too few for a training and a held-out "
                                           "part")
    shareable = settings.model_copy(update={"discord_token": None, "telegram_token": None, "vllm_api_key": None})
    start = {k: start[k] for k in ("id", "lineage", "number", "path")} if start else None
    return LineageJob(lineage, number, data, shareable, start, retrain)


def train_and_gate(job: LineageJob, backend: ModelBackend) -> JobResult:
    """Train the job's generation, gate it and write it to the shared generations folder (never promotes)."""
    started = time.perf_counter()
    settings, data, start = job.settings, job.data, job.start
    cfg = settings.training
    train_pairs, known = data.train_pairs, {}
    if start is not None:  # a warm night learns only what the serving generation does not know yet
        train_pairs, known = _unknown_pairs(backend, data, adapter_name(start), Path(start["path"]))
        if len(train_pairs) < cfg.batch_size * cfg.grad_accum:
            return JobResult("skipped", f"nothing new to learn: the serving generation already prefers the picked "
                                        f"reply in {sum(known.values())} of {len(known)} pairs")
    folder = lineage_dir(settings, job.lineage)
    private_dir(folder)
    for stale in folder.glob(".partial-*"):  # left by a dead worker: never visible, safe to remove
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"gen-{job.number:04d}"
    if job.attempt and final.exists():  # written by the lost attempt, never recorded: this one replaces it
        shutil.rmtree(final)
    partial = folder / f".partial-gen-{job.number:04d}-{os.getpid()}"
    private_dir(partial)  # the adapter folder, like every data folder, is this user's only

    result = train_adapter(backend, train_pairs, data.thumbs, cfg, partial,
                           max_reply_tokens=settings.sampling.max_new_tokens,
                           start_from=Path(start["path"]) if start else None)
    backend.load_adapter("candidate", partial)
    current_name = None
    if start is not None:
        current_name = adapter_name(start)
        backend.load_adapter(current_name, Path(start["path"]))
    try:
        report: GateReport = evaluate(backend, data.heldout_pairs, "candidate", current_name, settings.gate,
                                      settings.sampling, data.train_pairs)
    finally:
        backend.model = backend.model.unload()  # back to the plain base for the next job
    if start is not None:  # every new pick, tested once by the generation that had not learned it
        heldout_wins = report.metrics["accuracy_current"] * len(data.heldout_pairs)  # scored by the gate
        new_wins = [known[id(p)] for p in data.new_train_pairs]
        report.metrics["serving_accuracy_on_new"] = (sum(new_wins) + heldout_wins) / (len(new_wins) +
                                                                                      len(data.heldout_pairs))
        report.metrics["serving_tested_pairs"] = len(new_wins) + len(data.heldout_pairs)
        report.metrics["known_pairs"] = sum(known.values())

    metrics = {**result.metrics, **report.metrics, "train_pairs": result.pairs, "thumbs": result.thumbs,
               "planned_pairs": len(data.train_pairs), "job_seconds": round(time.perf_counter() - started, 1),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,  # this process's peak
               **({"peak_gpu_mb": torch.cuda.max_memory_allocated() // 2**20} if torch.cuda.is_available() else {}),
               "picks": data.picks, "new_picks": data.new_picks, "replay_pairs": data.replay_pairs}
    metadata = {
        "lineage": job.lineage, "number": job.number, "parent": start["number"] if start else None,
        "created_at": now(), "base_model": settings.model.name, "last_pick_id": data.last_pick_id,
        "training": cfg.model_dump(), "gate": settings.gate.model_dump(), "passed": report.passed,
        "reasons": report.reasons, "metrics": metrics, "heldout_pick_ids": data.heldout_pick_ids,
    }
    (partial / "metadata.json").write_text(json.dumps(metadata, ensure_ascii=False, indent=2, default=str))
    shutil.rmtree(partial / "trainer", ignore_errors=True)
    fsync_tree(partial)  # on disk before it becomes visible: a power cut cannot leave a named, empty adapter
    partial.rename(final)  # atomic: the generation appears whole or not at all
    fsync_tree(folder, files=False)
    return JobResult("trained", "; ".join(report.reasons), str(final), report.passed, metrics)


def record(store: Store, settings: Settings, job: LineageJob, result: JobResult) -> Outcome:
    """Add the job's generation to the database and serve it if its gate passed (the rollover process only)."""
    lineage, attempts = job.lineage, job.attempt + 1
    if result.status != "trained":
        return Outcome(lineage, "skipped", result.reason, attempts=attempts)
    final, data = Path(result.path), job.data
    status = "promoted" if result.passed else "rejected"
    used_picks = [p["pick_id"] for p in data.train_pairs + data.heldout_pairs]
    contributors = {p["user_id"] for p in data.train_pairs + data.heldout_pairs} | {t["user_id"] for t in data.thumbs}
    contributors.discard(None)
    with store.transaction():  # promoted only if nobody forgot or opted out while it trained
        kept = store.learnable(used_picks, contributors) and store.flag(RETRAIN_FROM_BASE + lineage) == job.retrain
        if kept:
            generation_id = store.add_generation(lineage, job.number, str(final), job.start["id"] if job.start else None,
                                                 status, result.metrics, data.last_pick_id, result.reason)
            if result.passed:
                store.set_serving(lineage, generation_id)
                if job.retrain:  # nobody forgot since this night began (checked above)
                    store.set_flag(RETRAIN_FROM_BASE + lineage, None)
    if not kept:
        shutil.rmtree(final, ignore_errors=True)
        logger.info("%s: generation %d discarded, a user forgot their data or stopped learning meanwhile",
                    lineage, job.number)
        return Outcome(lineage, "skipped", "discarded: a user whose picks it learned from deleted their data or "
                                           "turned learning off while it trained", attempts=attempts)
    prune(store, settings, lineage)
    return Outcome(lineage, status, result.reason, job.number, result.metrics, attempts)


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


def _unknown_pairs(backend: ModelBackend, data, name: str, path: Path) -> tuple[list[dict], dict[int, bool]]:
    """Tonight's training pairs the serving generation does not win yet, and for every pair (by id) whether
    it does. Pushing pairs it already wins would only move it further the same way (a learned fact
    creeping into every reply); a lesson it has forgotten comes back through the replay sample."""
    backend.load_adapter(name, path)
    try:
        wins = pair_wins(backend, data.train_pairs, name)
    finally:
        backend.model = backend.model.unload()  # training starts from the plain base
    return [p for p, won in zip(data.train_pairs, wins) if not won], \
        {id(p): won for p, won in zip(data.train_pairs, wins)}


def _heldout_of(generation: dict | None) -> list[int]:
    """The picks a generation held out for its gate (untrained: the next night learns them)."""
    if generation is None:
        return []
    metadata = Path(generation["path"]) / "metadata.json"
    return json.loads(metadata.read_text()).get("heldout_pick_ids", []) if metadata.exists() else []
