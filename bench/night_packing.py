"""Users trained per hour on one machine: a night's lineages one after another vs several at once (packed).

    python bench/night_packing.py                          # 4 users: sequential vs 2 jobs at once on Ray
    python bench/night_packing.py --modes sequential,ray:1,ray:2 --users 2   # also Ray with one job at a time
    python bench/night_packing.py --users 8 --modes sequential,ray:4         # 4 jobs at once, cores/4 threads each

Every user is a scripted fact user (training/scenarios.py) with the same number of picks; each mode
runs the real rollover (train, gate, record) on its own copy of the same database, in one run:

    sequential   training.executor = "local": one job at a time in one process, torch on every core
    ray:N        training.executor = "ray": a local Ray with every core and N jobs at once (packed), each
                 declaring cores/N CPUs (torch uses that many threads), each worker with its own copy of
                 the base model; ray:1 is Ray with one job at a time (its own overhead)

It prints, per mode: the night's wall time, users per hour, the gain over sequential, the mean job
time split into training and the rest (the warm-start check and the gate), and the largest peak
memory of a process that ran jobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bot.config import load_settings
from bot.model import ModelBackend
from bot.store import Store
from training import scenarios
from training.rollover import run_rollover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--picks", type=int, default=40, help="picks per user (all new: one first night each)")
    parser.add_argument("--modes", default="sequential,ray:2", help="sequential and/or ray:N (N jobs at once)")
    parser.add_argument("--gpu", action="store_true", help="ray:N jobs share one GPU (1/N each, one CPU each)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        seeded = Path(tmp) / "seeded"
        settings = load_settings(storage={"data_dir": seeded}, training={"min_new_picks": 1})
        backend = ModelBackend.load(settings.model)  # converts the embedded model once, before any worker
        store = Store(settings.storage.db_path)
        for i in range(args.users):
            scenarios.add_picks(store, settings, backend.count_tokens, scenarios.SCENARIOS["fact"], f"bench:u{i}",
                                args.picks)
        store.close()
        del backend
        print(f"{args.users} users x {args.picks} picks (fact scenario), {cores} cores, "
              f"{settings.model.name} ({settings.model.dtype})")
        rows = {}
        for mode in args.modes.split(","):
            data = Path(tmp) / mode
            shutil.copytree(seeded, data)
            if mode != "sequential" and not mode.startswith("ray:"):
                parser.error(f"unknown mode {mode!r}")
            slots = int(mode.partition(":")[2] or 1)
            per_job = {"cpus_per_job": 1, "gpus_per_job": 1 / slots} if args.gpu else \
                {"cpus_per_job": max(1, cores // slots)}
            run_settings = load_settings(
                storage={"data_dir": data}, model={"threads": cores}, ray={"local_cpus": cores, **per_job},
                training={"min_new_picks": 1, "executor": "local" if mode == "sequential" else "ray"})
            started = time.perf_counter()
            outcomes = run_rollover(run_settings)
            seconds = time.perf_counter() - started
            jobs = [o.metrics for o in outcomes if o.metrics]
            rows[mode] = {
                "slots": slots, "seconds": seconds, "per_hour": args.users / seconds * 3600,
                "job": sum(m["job_seconds"] for m in jobs) / max(1, len(jobs)),
                "train": sum(m["train_seconds"] for m in jobs) / max(1, len(jobs)),
                "rss": max((m["peak_rss_mb"] for m in jobs), default=0),
                "gpu": max((m.get("peak_gpu_mb", 0) for m in jobs), default=0),
                "statuses": sorted(o.status for o in outcomes)}
            print(f"  {mode}: {seconds / 60:.1f} min, {rows[mode]['statuses']}", flush=True)
    base = rows.get("sequential", next(iter(rows.values())))["per_hour"]
    print("\n| mode | jobs at once | night | users per hour | vs sequential | mean job (training + rest) "
          "| peak memory of a worker |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['slots']} | {r['seconds'] / 60:.1f} min | {r['per_hour']:.1f} | "
              f"{r['per_hour'] / base:.2f}x | {r['job'] / 60:.1f} min ({r['train'] / 60:.1f} + "
              f"{(r['job'] - r['train']) / 60:.1f}) | {r['rss'] / 1024:.1f} GB"
              + (f", GPU {r['gpu'] / 1024:.1f} GB |" if r["gpu"] else " |"))


if __name__ == "__main__":
    main()
