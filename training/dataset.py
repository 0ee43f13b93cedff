"""A night's training data from the store: fresh picks, a bounded replay sample, a rotating held-out share.

    from training.dataset import plan_night
    data = plan_night(store, ["discord:1234"], settings.training, serving=store.serving(lineage),
                      serving_heldout=[...], night=7)
    data.train_pairs, data.heldout_pairs, data.thumbs

Each night continues the serving generation (see training/train.py), so it trains on what that
generation has not learned yet, never on the whole history again:

    fresh     picks newer than the serving generation's data, plus the picks it held out for its own
              gate (tested once, now learned)
    held-out  a rotating share of the new picks (a different share each night, chosen by a hash of
              pick and night), kept out of tonight's training for the gate, and trained the next night
    replay    a random sample of older picks, so earlier lessons are kept; it fills the night's budget
              of pairs (`training.pairs_per_night`) and is at least `replay_share` of it when the
              history allows

Every pick is tested once before it is trained: the serving generation is scored on tonight's new
picks (the held-out share and `new_train_pairs`) before the night learns them, so "how often did the companion already prefer
what the user picked" is measured on every pick, and the held-out share also tests the new generation.

On a warm night the rollover then trains only the pairs the serving generation does not win yet
(training/rollover.py); `train_pairs` is the plan before that filter.

The night's cost therefore depends on the budget, not on how long the user has been chatting. Each pick
gives up to `max_rejected` pairs (prompt exactly as the model saw it, chosen, one rejected sibling), so
a pick among many candidates does not repeat its chosen reply many times; pairs whose two sides are the
same text carry no preference and are left out. Users who opted out are never read.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import Callable

from bot.config import TrainingSettings
from bot.store import Store


@dataclass
class PreferenceData:
    train_pairs: list[dict] = field(default_factory=list)
    heldout_pairs: list[dict] = field(default_factory=list)
    thumbs: list[dict] = field(default_factory=list)
    last_pick_id: int = 0
    picks: int = 0                      # usable picks in the whole history
    new_picks: int = 0                  # picks the serving generation has not learned
    replay_pairs: int = 0
    heldout_pick_ids: list[int] = field(default_factory=list)
    new_train_pairs: list[dict] = field(default_factory=list)  # the trained pairs from new picks: with the
    # held-out ones, what the serving generation never trained on, so it is tested on them first


def pick_pairs(records: list[dict], max_rejected: int = 2) -> list[dict]:
    pairs = []
    for record in records:
        rejected = [r for r in record["rejected"] if r.strip() != record["chosen"].strip()]
        for text in rejected[:max_rejected]:
            pairs.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": text,
                          "context": record["context"], "set_id": record["set_id"], "pick_id": record["pick_id"],
                          "user_id": record.get("user_id")})
    return pairs


def overdone_pairs(pairs: list[dict]) -> list[dict]:
    """For each pair whose chosen reply is its rejected one with pieces added (걷자! -> 걷자냥!, the same
    piece each time), a pair of that chosen reply over the same reply with each piece twice (걷자냥냥!).

    Teaching only "the piece is better than no piece" also teaches "more of it is better": measured on a
    taught speech style, 10% of sampled replies ran into 냥냥냥냥... These pairs teach where it stops.
    """
    extra = []
    for pair in pairs:
        chosen, rejected = pair["chosen"], pair["rejected"]
        matcher = SequenceMatcher(None, rejected, chosen, autojunk=False)
        edits = [op for op in matcher.get_opcodes() if op[0] != "equal"]
        pieces = {chosen[j1:j2] for _, _, _, j1, j2 in edits}
        if not edits or any(op[0] != "insert" for op in edits) or len(pieces) != 1 or not next(iter(pieces)).strip():
            continue
        doubled, last = [], 0
        for _, _, _, j1, j2 in edits:
            doubled.append(chosen[last:j2] + chosen[j1:j2])
            last = j2
        extra.append({**pair, "rejected": "".join(doubled) + chosen[last:], "overdone": True})
    return extra


def rotation(pick_id: int, night: int) -> float:
    """A stable pseudo-random number in [0, 1) for this pick on this night (a new order every night)."""
    digest = hashlib.sha256(f"{pick_id}:{night}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def plan_night(store: Store, users: list[str] | None, cfg: TrainingSettings, serving: dict | None = None,
               serving_heldout: list[int] | None = None, night: int = 1) -> PreferenceData:
    """Tonight's training and held-out pairs for `users` (None: everyone), continuing `serving`."""
    ids = sorted(i for user in (users or [None]) for i in store.pick_ids(user))
    if not ids:
        return PreferenceData()
    learned_through = serving["last_pick_id"] if serving else 0
    known = set(ids)
    new = [i for i in ids if i > learned_through]
    retest = {i for i in (serving_heldout or []) if i in known and i <= learned_through}

    heldout_count = min(max(round(len(new) * cfg.heldout_fraction), cfg.min_heldout_picks), len(new) // 2)
    heldout = sorted(sorted(new, key=lambda i: rotation(i, night))[:heldout_count])
    fresh = sorted(set(new) - set(heldout) | retest)
    old = [i for i in ids if i <= learned_through and i not in retest]

    def pairs_of(pick_ids: list[int]) -> list[dict]:
        records = [r for user in (users or [None]) for r in store.preference_records(user, pick_ids=pick_ids)]
        return pick_pairs(sorted(records, key=lambda r: r["pick_id"]), cfg.max_rejected_per_pick)

    budget = cfg.pairs_per_night
    replay_floor = min(len(old), round(budget * cfg.replay_share))
    fresh_pairs = pairs_of(fresh)[-(budget - min(replay_floor, budget // 2)):]  # newest first when over budget
    room = budget - len(fresh_pairs)
    sample = random.Random(night).sample(old, min(len(old), room)) if room > 0 else []
    replay = pairs_of(sample)[:room]
    thumbs = [t for user in (users or [None]) for t in store.thumb_records(user)][-budget:]
    return PreferenceData(
        train_pairs=fresh_pairs + replay,
        heldout_pairs=pairs_of(heldout),
        thumbs=thumbs,
        last_pick_id=ids[-1],
        picks=len(ids),
        new_picks=len(new),
        replay_pairs=len(replay),
        heldout_pick_ids=heldout,
        new_train_pairs=[p for p in fresh_pairs if p["pick_id"] > learned_through],
    )


def trim_prompt(prompt: str, reply_tokens: int, max_length: int, count_tokens: Callable[[str], int]) -> str | None:
    """Fit prompt + reply into `max_length` tokens by dropping the oldest dialogue lines, never the reply.

    The persona block (everything before the first blank line) and the last line (the persona's label,
    where the reply starts) are kept; None when even that does not fit.
    """
    if count_tokens(prompt) + reply_tokens <= max_length:
        return prompt
    head, sep, body = prompt.partition("\n\n")
    lines = body.split("\n")
    while len(lines) > 1:
        lines.pop(0)
        candidate = head + sep + "\n".join(lines)
        if count_tokens(candidate) + reply_tokens <= max_length:
            return candidate
    return None
