"""Does a night learn sooner from ranked offers? The same messages, offered at random or ranked, then a real night.

    python bench/ranked_learning.py                      # the fact user, 60 messages
    python bench/ranked_learning.py --trait style --messages 40

A scripted user (training/scenarios.py) sends `--messages` messages. For each, an offer of 8 replies is
built as bench/ranking_hits.py builds it (their pick, the sibling they rejected, replies to other messages,
every reply with the serving path's signals), and 3 are shown:

    random   3 of the 8 at random (what showing N unranked samples amounts to)
    ranked   the best 3 by the user's ranker, learned after each pick (bot/ranking.py, as live)

The user picks their reply when it is shown; when it is not, none of the shown replies is theirs and the
message gives no pick (a live user would regenerate or move on). Each arm's picks (chosen over the
shown siblings) are stored through `banryeo picks import`'s code path, and the real rollover runs one
night with the default gate. Printed per arm: picks gained, the night's verdict and figures, and the
new generation's accuracy on the scenario's never-stored pairs (base: the model before any night).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from bot import ranking
from bot.config import load_settings
from bot.generations import adapter_name
from bot.model import ModelBackend
from bot.picks_import import import_pick_records
from bot.store import Store
from persona import PersonaLibrary
from training import scenarios
from training.gate import pick_accuracy
from training.rollover import run_rollover

from ranking_hits import build_offers, pick_features  # bench/ranking_hits.py, beside this file

SHOWN = 3


def picks_of(arm: str, records: list[dict], offers, cfg, seed: int = 0) -> list[dict]:
    """The pick records this arm's offers give: the user's reply over the shown siblings, when shown."""
    rng = random.Random(seed)
    weights, learned, picks = None, [], []
    for record, offer in zip(records, offers):
        replies = offer.replies  # [chosen, rejected..., others...]
        if arm == "random":
            shown = rng.sample(range(len(replies)), min(SHOWN, len(replies)))
        else:
            scores = ranking.scores(replies, weights, cfg)
            shown = sorted(range(len(replies)), key=lambda i: -(scores[i] or 0.0))[:SHOWN]
        if 0 not in shown:
            continue
        siblings = [i for i in shown if i != 0]
        picks.append({**record, "user": f"bench:{arm}", "rejected": [replies[i].text.strip() for i in siblings]})
        if arm == "ranked":
            learned.append(ranking.PickFeatures(pick_features(offer, cfg).chosen,
                                                [ranking.sample_features(replies[i], cfg)[1] for i in siblings]))
            weights = ranking.fit(learned[-cfg.history_picks:], weights, cfg)
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trait", choices=list(scenarios.SCENARIOS), default="fact")
    parser.add_argument("--messages", type=int, default=60)
    parser.add_argument("--arms", default="random,ranked")
    args = parser.parse_args()
    scenario = scenarios.SCENARIOS[args.trait]
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(storage={"data_dir": Path(tmp) / "offers"})
        personas = PersonaLibrary(settings.storage.persona_dir)
        personas.save(scenarios.persona())
        backend = ModelBackend.load(settings.model)
        records = scenarios.pick_records(scenario, "bench:user", args.messages)
        offers = build_offers(backend, settings, records, personas, 8)
        unseen = scenarios.unseen_pairs(settings, backend.count_tokens, scenario)
        print(f"{args.trait}: {args.messages} messages, offers of 8, {SHOWN} shown; "
              f"base accuracy on never-stored pairs {pick_accuracy(backend, unseen, None):.2f}")
        for arm in args.arms.split(","):
            picks = picks_of(arm, records, offers, settings.ranking)
            night_settings = load_settings(storage={"data_dir": Path(tmp) / arm})
            PersonaLibrary(night_settings.storage.persona_dir).save(scenarios.persona())
            store = Store(night_settings.storage.db_path)
            if picks:
                import_pick_records(store, night_settings, picks, backend.count_tokens)
            started = time.perf_counter()
            [outcome] = run_rollover(night_settings, backend=backend) or [None]
            minutes = (time.perf_counter() - started) / 60
            print(f"\n  {arm}: {len(picks)} picks from {args.messages} messages, night {minutes:.1f} min")
            print("    " + (outcome.line() if outcome else "nothing to train").replace("\n", "\n    "))
            serving = store.serving("bench:" + arm)
            if serving is not None:
                name = adapter_name(serving)
                backend.load_adapter(name, serving["path"])
                print(f"    served gen-{serving['number']}: accuracy on never-stored pairs "
                      f"{pick_accuracy(backend, unseen, name):.2f}")
                backend.model = backend.model.unload()
            store.close()


if __name__ == "__main__":
    main()
