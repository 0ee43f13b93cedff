"""Nights of learning on the embedded model, with figures: a scripted user teaches one trait the prompt
does not contain (training/scenarios.py), night after night, through the real rollover and the default gate.

    python bench/learning.py                                  # both traits, one night of 60 picks
    python bench/learning.py --trait fact --nights 10         # 60 new picks a night: history 60 -> 600
    python bench/learning.py --trait style --history $(seq -s, 80 20 660)   # 30 nights: 80 picks, then 20 a night
    python bench/learning.py --trait fact --history 60,120,540,600    # a night's cost at 60..600 picks

For each trait it prints every night's verdict and cost (minutes, pairs trained, pairs a minute, history
length), then base vs the first night vs the last night: accuracy on new-topic pairs never stored
(mean-token, chosen vs the same reply without the trait), how often sampled replies carry the trait
where it fits and where it does not, distinct-2, loops and length.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bot.config import load_settings
from bot.generations import adapter_name
from bot.model import ModelBackend
from bot.store import Store
from training import scenarios
from training.rollover import run_rollover


def run_trait(key: str, new_picks: list[int], samples: int) -> None:
    """One scripted user over len(new_picks) nights; night i adds new_picks[i] picks before it runs."""
    scenario = scenarios.SCENARIOS[key]
    user = f"bench:{key}"
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(storage={"data_dir": tmp}, training={"min_new_picks": 1},
                                 gate={"samples_per_context": samples})
        backend = ModelBackend.load(settings.model)
        store = Store(settings.storage.db_path)
        rows = {"base": scenarios.measure(backend, settings, scenario, None)}
        nights = len(new_picks)
        print(f"\n{key}: {scenario.marker!r}, {nights} night(s), new picks a night: {new_picks}")
        for night, picks in enumerate(new_picks, start=1):
            scenarios.add_picks(store, settings, backend.count_tokens, scenario, user, picks,
                                start=sum(new_picks[:night - 1]))
            started = time.perf_counter()
            [outcome] = run_rollover(settings, backend=backend)
            minutes = (time.perf_counter() - started) / 60
            m = outcome.metrics or {}
            if not m:  # skipped before training: nothing else to show
                print(f"  night {night:2}: {minutes:4.1f} min, {outcome.status} ({outcome.reason})")
            else:
                overdone = m.get("overdone_pairs", 0)
                print(f"  night {night:2}: {minutes:4.1f} min (training {m.get('train_seconds', 0) / 60:.1f}), "
                      f"history {m.get('picks', 0)} picks, trained {m.get('train_pairs', 0) - overdone} of "
                      f"{m.get('planned_pairs', 0)} planned pairs ({m.get('replay_pairs', 0)} replayed, "
                      f"+{overdone} overdone), "
                      f"{m.get('dpo_steps', 0)}/{m.get('dpo_max_steps', 0)} steps, "
                      f"{m.get('pairs_per_minute', 0):.0f} pairs/min")
                print("           " + outcome.line().partition(": ")[2].replace("\n", "\n           "))
            serving = store.serving(user)
            if night in (1, nights) and serving is not None:  # what the user talks to after that night
                name = adapter_name(serving)
                backend.load_adapter(name, serving["path"])
                rows[f"night {night} (gen-{serving['number']})"] = scenarios.measure(backend, settings, scenario, name)
                backend.model = backend.model.unload()
        base = rows["base"]
        print(f"  {'':22} {'accuracy':>8} {'fits':>6} {'off-topic':>9} {'distinct-2':>10} {'loops':>6} {'length':>7}")
        for label, r in rows.items():
            print(f"  {label:22} {r['accuracy']:8.2f} {r['trait_related']:6.0%} {r['trait_unrelated']:9.0%} "
                  f"{r['distinct2'] / base['distinct2']:9.2f}x {r['loops']:6.0%} {r['length'] / base['length']:6.2f}x")
        for label, r in rows.items():
            print(f"  {label}: " + " | ".join(r["examples"]))
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trait", choices=[*scenarios.SCENARIOS, "both"], default="both")
    parser.add_argument("--nights", type=int, default=1)
    parser.add_argument("--picks", type=int, default=60, help="new picks a night")
    parser.add_argument("--history", help="comma-separated history lengths after each night (instead of "
                        "--nights/--picks), e.g. 60,120,540,600: a night's cost as the history grows")
    parser.add_argument("--samples", type=int, default=6, help="samples per probe prompt")
    args = parser.parse_args()
    if args.history:
        sizes = [int(h) for h in args.history.split(",")]
        new_picks = [b - a for a, b in zip([0, *sizes], sizes)]
        if min(new_picks) < 1:
            parser.error("--history must grow from night to night")
    else:
        new_picks = [args.picks] * args.nights
    for key in scenarios.SCENARIOS if args.trait == "both" else [args.trait]:
        run_trait(key, new_picks, args.samples)


if __name__ == "__main__":
    main()
