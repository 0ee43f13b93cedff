"""Preference pairs from stored picks, in the (prompt, chosen, rejected) form TRL's DPOTrainer reads.

    from bot.store import Store
    from training.dataset import pick_pairs
    pairs = pick_pairs(Store("~/.local/share/banryeo/banryeo.db"), user_id="discord:1234")

Each pick yields one pair per rejected sibling, at most `max_rejected` of them, so a pick among many
candidates does not repeat its chosen reply many times. Pairs whose two sides are the same text are
left out: they carry no preference.
"""

from __future__ import annotations

from bot.store import Store


def pick_pairs(store: Store, user_id: str | None = None, max_rejected: int = 2) -> list[dict[str, str]]:
    pairs = []
    for record in store.preference_records(user_id):
        rejected = [r for r in record["rejected"] if r.strip() != record["chosen"].strip()]
        for text in rejected[:max_rejected]:
            pairs.append({"prompt": record["prompt"], "chosen": " " + record["chosen"], "rejected": " " + text,
                          "set_id": record["set_id"]})
    return pairs
