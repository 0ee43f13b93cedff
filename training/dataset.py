"""Training data from the store: DPO pairs from picks, KTO rows from thumbs, a held-out split by time.

    from training.dataset import build_dataset
    data = build_dataset(store, users=["discord:1234"], heldout_fraction=0.2)
    data.train_pairs, data.heldout_pairs, data.thumbs

Each pick gives up to `max_rejected` pairs (prompt exactly as the model saw it, chosen, one rejected
sibling), so a pick among many candidates does not repeat its chosen reply many times. Pairs whose two
sides are the same text carry no preference and are left out. The held-out split is the newest picks,
and the siblings of one pick never straddle the split. Users who opted out are never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from bot.store import Store


@dataclass
class PreferenceData:
    train_pairs: list[dict] = field(default_factory=list)
    heldout_pairs: list[dict] = field(default_factory=list)
    thumbs: list[dict] = field(default_factory=list)
    last_pick_id: int = 0
    picks: int = 0


def pick_pairs(records: list[dict], max_rejected: int = 2) -> list[dict]:
    pairs = []
    for record in records:
        rejected = [r for r in record["rejected"] if r.strip() != record["chosen"].strip()]
        for text in rejected[:max_rejected]:
            pairs.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": text,
                          "context": record["context"], "set_id": record["set_id"], "pick_id": record["pick_id"]})
    return pairs


def build_dataset(store: Store, users: list[str] | None, heldout_fraction: float = 0.2,
                  max_rejected: int = 2) -> PreferenceData:
    """All usable picks (and thumbs) of `users` (None: everyone), split by time into train and held-out."""
    records = [r for user in (users or [None]) for r in store.preference_records(user)]
    records.sort(key=lambda r: r["pick_id"])
    if not records:
        return PreferenceData()
    heldout_count = max(1, round(len(records) * heldout_fraction)) if len(records) > 1 else 0
    cut = len(records) - heldout_count
    thumbs = [t for user in (users or [None]) for t in store.thumb_records(user)]
    return PreferenceData(
        train_pairs=pick_pairs(records[:cut], max_rejected),
        heldout_pairs=pick_pairs(records[cut:], max_rejected),
        thumbs=thumbs,
        last_pick_id=records[-1]["pick_id"],
        picks=len(records),
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
