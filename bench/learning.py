"""One night of learning on the embedded model, with figures: a scripted user always picks the reply
that calls their dog 콩이 over the same reply saying 강아지 (see training/scripted.py).

    python bench/learning.py                 # 50 picks (40 trained, 10 held out)
    python bench/learning.py --picks 120

Prints the gate's figures (held-out pick accuracy against the base, distinct-2, self-BLEU, loops,
length, KL) and, on everyday prompts where the dog does not belong, how often the name appears and
how varied the replies are, for the base and the new generation side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bot.config import SamplingSettings, load_settings
from bot.lineage import adapter_name
from bot.model import ModelBackend
from bot.store import Store
from training import scripted
from training.gate import sample_stats
from training.rollover import run_rollover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picks", type=int, default=50)
    parser.add_argument("--samples", type=int, default=6, help="samples per everyday prompt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(storage={"data_dir": tmp}, training={"min_new_picks": 1},
                                 gate={"probe_contexts": 8, "samples_per_context": args.samples})
        backend = ModelBackend.load(settings.model)
        store = Store(settings.storage.db_path)
        card = scripted.persona()
        scripted.add_scripted_picks(store, backend, card, "bench:kong", args.picks)
        started = time.perf_counter()
        [outcome] = run_rollover(settings, backend=backend)
        elapsed = time.perf_counter() - started
        m = outcome.metrics
        print(f"{args.picks} picks, night took {elapsed / 60:.1f} min (training {m['train_seconds'] / 60:.1f} min); "
              f"gate: {outcome.status} {outcome.reason}")
        print(f"  held-out pick accuracy  base {m['accuracy_base']:.2f} -> {m['accuracy']:.2f}")
        for key in ("distinct2", "self_bleu", "repetition", "length"):
            print(f"  {key:22} base {m[key + '_base']:.3f} -> {m[key]:.3f}")
        print(f"  KL from base           {m['kl_per_token']:.3f} nats/token")
        generation = store.serving("bench:kong") or store.generations("bench:kong")[-1]
        name = adapter_name(generation)
        backend.load_adapter(name, generation["path"])
        gate = settings.gate
        for prompts, label in ((scripted.OPEN_MESSAGES, "everyday prompts"), (scripted.DOG_MESSAGES[:8], "dog prompts")):
            texts = [scripted.prompt_for(card, message, backend) for message in prompts]
            for who, adapter in (("base", None), (name, name)):
                stats = sample_stats(backend, texts, adapter, gate, SamplingSettings())
                replies = [t for row in stats["samples"] for t in row]
                print(f"  {label:16} {who:18} name in {scripted.trait_rate(replies):5.1%} of replies, "
                      f"'{scripted.PLAIN}' in {sum(scripted.PLAIN in r for r in replies) / len(replies):5.1%}, "
                      f"distinct-2 {stats['distinct2']:.3f}, loops {stats['repetition']:.0%}")


if __name__ == "__main__":
    main()
