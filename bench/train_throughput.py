"""Training throughput on CPU at the embedded model's size: DPO pairs per minute with the nightly settings,
against the two things that used to make it slow, side by side in one process.

    python bench/train_throughput.py               # 32 pairs of the fact scenario, 1 epoch
    python bench/train_throughput.py --pairs 64 --epochs 2 --dtypes float32,bfloat16

    nightly        reference log-probs precomputed once, the LM head on completion tokens only
    every token    TRL's CPU default: every prompt position goes through the 262k-word LM head too
    reference      the reference pass inside every step instead of once
and, with --dtypes, the nightly settings in another dtype (bfloat16 is emulated on CPUs without
AVX512-BF16, where its backward pass is far slower).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import training.train
from bot.config import load_settings
from bot.model import ModelBackend
from bot.store import Store
from training import scenarios
from training.dataset import plan_night
from training.train import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--dtypes", default="", help="more dtypes to run the nightly settings in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(storage={"data_dir": tmp}, training={"epochs": args.epochs})
        backend = ModelBackend.load(settings.model)
        store = Store(Path(tmp) / "bench.db")
        scenarios.add_picks(store, settings, backend.count_tokens, scenarios.SCENARIOS["fact"], "bench:user",
                            args.pairs + 1)
        pairs = plan_night(store, ["bench:user"], settings.training.model_copy(
            update={"min_heldout_picks": 1, "heldout_fraction": 0.01})).train_pairs[: args.pairs]
        print(f"{len(pairs)} pairs, {args.epochs:g} epoch(s), prompts of about "
              f"{backend.count_tokens(pairs[0]['prompt'])} tokens, {backend.model.dtype}, 2 threads")
        runs = [("nightly", {}, True), ("every token", {}, False), ("reference", {"precompute_ref": False}, True)]
        results = {}
        for label, change, completion_only in runs:
            cfg = settings.training.model_copy(update=change)
            original = training.train.completion_tokens_only
            if not completion_only:
                training.train.completion_tokens_only = contextlib.nullcontext
            try:
                results[label] = train_adapter(backend, pairs, [], cfg, Path(tmp) / label).metrics
            finally:
                training.train.completion_tokens_only = original
        for dtype in filter(None, args.dtypes.split(",")):
            other = ModelBackend.load(settings.model.model_copy(update={"dtype": dtype}))
            results[f"nightly, {dtype}"] = train_adapter(other, pairs, [], settings.training, Path(tmp) / dtype).metrics
    base = results["nightly"]["train_seconds"]
    for label, m in results.items():
        print(f"  {label:22} {m['train_seconds']:7.1f} s  {m['pairs_per_minute']:6.1f} pairs/min  "
              f"{m['train_seconds'] / base:5.2f}x the nightly time")


if __name__ == "__main__":
    main()
