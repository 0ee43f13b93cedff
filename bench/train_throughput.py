"""Training throughput on CPU at the embedded model's size: DPO pairs per minute, and the share of a
training epoch spent in the reference (base model) pass.

    python bench/train_throughput.py               # 32 scripted pairs, 1 epoch
    python bench/train_throughput.py --pairs 64 --epochs 2

The reference pass is measured by having TRL precompute the reference log-probs once (timed on its
own), then training with them; the same pairs are then trained with the reference computed inside
every step, as the nightly job does. Both runs happen in this one process, side by side.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bot.config import load_settings
from bot.model import ModelBackend
from bot.store import Store
from training import scripted
from training.dataset import build_dataset
from training.train import train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(storage={"data_dir": tmp}, training={"epochs": args.epochs})
        backend = ModelBackend.load(settings.model)
        store = Store(Path(tmp) / "bench.db")
        scripted.add_scripted_picks(store, backend, scripted.persona(), "bench:user", args.pairs)
        pairs = build_dataset(store, ["bench:user"], heldout_fraction=0.01).train_pairs
        results = {}
        for precompute in (True, False):
            cfg = settings.training.model_copy(update={"precompute_ref": precompute})
            results[precompute] = train_adapter(backend, pairs, [], cfg, Path(tmp) / f"out-{precompute}")
    inline = results[False].metrics
    pre = results[True].metrics
    ref_seconds = pre["reference_seconds"]
    per_epoch_inline = inline["train_seconds"] / args.epochs
    print(f"{len(pairs)} pairs, {args.epochs:g} epoch(s), prompts of about {backend.count_tokens(pairs[0]['prompt'])} "
          f"tokens, bf16 on CPU")
    print(f"  reference computed in every step: {inline['train_seconds']:7.1f} s  "
          f"{inline['pairs_per_minute']:6.1f} pairs/min")
    print(f"  reference precomputed once:       {pre['train_seconds']:7.1f} s  {pre['pairs_per_minute']:6.1f} pairs/min "
          f"(of which the reference pass {ref_seconds:.1f} s)")
    print(f"  share of an epoch in the reference pass: {ref_seconds / per_epoch_inline:.0%}")


if __name__ == "__main__":
    main()
