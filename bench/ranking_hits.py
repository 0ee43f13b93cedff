"""Does ranking put the reply a user picks among the offered ones? Held-out picks, on the embedded model.

    python bench/ranking_hits.py                              # the scenario users (training/scenarios.py)
    python bench/ranking_hits.py --picks picks.jsonl          # any imported picks (`banryeo picks import` format)
    python bench/ranking_hits.py --scenarios fact --picks-per-user 90 --samples 8 --shown 3

Every pick becomes an offer of `--samples` replies: the user's chosen reply, the siblings they saw and
rejected, and replies written for the user's other messages (drawn at random from the same picks:
fluent, but answering something else, which is what most of a base model's bad samples are). Every
offered reply is human-written, so no reply is favoured for being the model's own text (the model's
own samples have a higher log-probability than anything a person wrote, and mixing the two would
measure that instead). Every reply gets the serving path's signals (ModelBackend.reply_signals: the
numbers the local generator reads while sampling). Then, for each ranking, how often the user's pick is
among the `--shown` best, against `--shown` chosen at random:

    random     the expected share: shown / offer size
    log-prob   mean token log-probability alone
    prior      log-prob + relevance (ranking.logprob_weight, ranking.relevance_weight): the ranking a
               new user gets
    learned    the per-user ranker, fit after every pick on the picks before it (each pick is ranked
               before it is learned: every pick is held out once), as bot/engine.py does it live

Scenario users are also measured on their never-stored test picks (`Scenario.test`: new messages, new
reply templates; the other replies come from their stored picks) with the ranker learned from all
their picks ("held-out set"). Hit rates are printed per stretch of picks, so the
learning curve shows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass


from bot import ranking
from bot.config import load_settings
from bot.model import ModelBackend
from bot.picks_import import ROLES, live_prompt, message_text, read_pick_lines, read_text_lines
from bot.prompt import Turn
from bot.serving import Sample
from persona import PersonaLibrary
from training import scenarios

METHODS = ("random", "log-prob", "prior", "learned")


@dataclass
class Offer:
    user: str
    chosen: Sample
    rejected: list[Sample]       # shown beside the chosen one in the original offer
    others: list[Sample]         # replies to other messages, standing in for off-topic samples

    @property
    def replies(self) -> list[Sample]:
        return [self.chosen, *self.rejected, *self.others]


def build_offers(backend: ModelBackend, settings, records: list[dict], personas: PersonaLibrary, size: int,
                 others_from: list[dict] | None = None, seed: int = 0) -> list[Offer]:
    """Each pick record as an offer of `size` replies with their signals; the replies to other messages
    come from `others_from` (default: the same records)."""
    rng = random.Random(seed)
    others_from = records if others_from is None else others_from
    pool = sorted({text for r in others_from for text in (r["chosen"], *r["rejected"])})
    offers = []
    started = time.perf_counter()
    for number, record in enumerate(records, 1):
        card = personas.get(record.get("persona", settings.chat.persona))
        turns = [Turn(ROLES[m["role"]], message_text(m["content"])) for m in record["context"]]
        prompt = live_prompt(card, turns, settings, backend.count_tokens)
        given = [record["chosen"], *record["rejected"]]
        answered = {m["content"] for m in record["context"]}
        others = [t for t in pool if t not in given and not any(_same_topic(t, r) for r in others_from
                                                                if r["context"][-1]["content"] in answered)]
        texts = [*given, *rng.sample(others, min(max(size - len(given), 0), len(others)))]
        scored = backend.reply_signals(prompt.text, prompt.unconditional, [f" {t}" for t in texts])
        offers.append(Offer(record["user"], scored[0], scored[1:len(given)], scored[len(given):]))
        if number % 50 == 0:
            print(f"  {number}/{len(records)} offers built ({time.perf_counter() - started:.0f} s)", flush=True)
    return offers


def _same_topic(text: str, record: dict) -> bool:
    """Whether `text` is one of the replies `record` (a pick on the same message) offered."""
    return text == record["chosen"] or text in record["rejected"]


def rank_of_chosen(offer: Offer, weights: list[float] | None, cfg) -> int:
    """The chosen reply's place (0: best) among the offer's replies under `weights`."""
    replies = {f"{i}": s for i, s in enumerate(offer.replies)}
    order = [item.text for item in ranking.score_samples(replies, weights, cfg)]
    return order.index("0")


def pick_features(offer: Offer, cfg) -> ranking.PickFeatures:
    return ranking.PickFeatures(ranking.sample_features(offer.chosen, cfg)[1],
                                [ranking.sample_features(r, cfg)[1] for r in offer.rejected])


def evaluate(offers: list[Offer], cfg, shown: int, seed: int = 0) -> dict[str, list[float]]:
    """Per method, per offer: 1.0 when the chosen reply is among the `shown` best (random: the chance)."""
    lp_only = cfg.model_copy(update={"relevance_weight": 0.0})
    hits: dict[str, list[float]] = {m: [] for m in METHODS}
    learned: dict[str, list[ranking.PickFeatures]] = {}
    weights: dict[str, list[float] | None] = {}
    for offer in offers:
        size = len(offer.replies)
        hits["random"].append(min(shown, size) / size)
        hits["log-prob"].append(float(rank_of_chosen(offer, None, lp_only) < shown))
        hits["prior"].append(float(rank_of_chosen(offer, None, cfg) < shown))
        hits["learned"].append(float(rank_of_chosen(offer, weights.get(offer.user), cfg) < shown))
        history = learned.setdefault(offer.user, [])   # then the pick is learned, as after a live pick
        history.append(pick_features(offer, cfg))
        weights[offer.user] = ranking.fit(history[-cfg.history_picks:], weights.get(offer.user), cfg)
    return hits


def held_out(offers: list[Offer], weights: list[float], cfg, shown: int) -> dict[str, float]:
    lp_only = cfg.model_copy(update={"relevance_weight": 0.0})
    return {"random": statistics.mean(min(shown, len(o.replies)) / len(o.replies) for o in offers),
            "log-prob": statistics.mean(rank_of_chosen(o, None, lp_only) < shown for o in offers),
            "prior": statistics.mean(rank_of_chosen(o, None, cfg) < shown for o in offers),
            "learned": statistics.mean(rank_of_chosen(o, weights, cfg) < shown for o in offers)}


def report(title: str, hits: dict[str, list[float]], stretches: list[tuple[int, int]]) -> None:
    print(f"\n{title}: share of picks among the shown (hit rate), by stretch of picks")
    print(f"  {'picks':>10} " + " ".join(f"{m:>9}" for m in METHODS))
    for first, last in stretches:
        row = {m: statistics.mean(hits[m][first:last]) for m in METHODS if hits[m][first:last]}
        if row:
            span = f"{first + 1}-{min(last, len(hits['random']))}"
            print(f"  {span:>10} " + " ".join(f"{row[m]:9.2f}" for m in METHODS))


def stretches_of(count: int) -> list[tuple[int, int]]:
    bounds = [0, 10, 30, 60, 120, 240, 480]
    out = [(a, b) for a, b in zip(bounds, bounds[1:]) if a < count]
    return out + [(0, count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="fact,style", help="scenario users to measure ('' for none)")
    parser.add_argument("--picks", help="a pick records file (JSON lines) to measure too")
    parser.add_argument("--picks-per-user", type=int, default=90, help="scenario picks per user")
    parser.add_argument("--samples", type=int, default=8, help="replies per offer (N)")
    parser.add_argument("--shown", type=int, default=3, help="replies shown (K)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(storage={"data_dir": tmp})
        personas = PersonaLibrary(settings.storage.persona_dir)
        personas.save(scenarios.persona())
        cfg = settings.ranking
        backend = ModelBackend.load(settings.model)
        print(f"offers of {args.samples} replies, {args.shown} shown; ranking: logprob_weight {cfg.logprob_weight}, "
              f"relevance_weight {cfg.relevance_weight}, state_dims {cfg.state_dims}, l2 {cfg.l2}")
        for key in [k for k in args.scenarios.split(",") if k]:
            scenario = scenarios.SCENARIOS[key]
            records = scenarios.pick_records(scenario, f"bench:{key}", args.picks_per_user)
            offers = build_offers(backend, settings, records, personas, args.samples)
            hits = evaluate(offers, cfg, args.shown)
            report(f"{key} ({len(offers)} picks, each ranked before it is learned)", hits, stretches_of(len(offers)))
            plain = [i for i, r in enumerate(records) if not scenario.carries(r["chosen"])]
            if plain:  # picks of the reply that answers the message, among replies to other messages
                print(f"  of which {len(plain)} picks without the trait (the reply that answers the message): "
                      + ", ".join(f"{m} {statistics.mean(hits[m][i] for i in plain):.2f}" for m in METHODS))
            test = [{"user": f"bench:{key}", "persona": "scripted", "context": [{"role": "user", "content": m}],
                     "chosen": c, "rejected": [r]} for m, c, r in scenario.test]
            test_offers = build_offers(backend, settings, test, personas, args.samples, others_from=records)
            weights = ranking.fit([pick_features(o, cfg) for o in offers][-cfg.history_picks:], None, cfg)
            rates = held_out(test_offers, weights, cfg, args.shown)
            print(f"  held-out set ({len(test_offers)} never-stored picks): "
                  + ", ".join(f"{m} {rates[m]:.2f}" for m in METHODS))
        if args.picks:
            records = read_pick_lines(read_text_lines(args.picks), source=args.picks)
            offers = build_offers(backend, settings, records, personas, args.samples)
            report(f"{args.picks} ({len(offers)} picks)", evaluate(offers, cfg, args.shown), stretches_of(len(offers)))


if __name__ == "__main__":
    main()
