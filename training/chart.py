"""A PNG chart of a lineage's generations: pick accuracy against the base, variety and drift.

    banryeo chart discord:1234 generations.png
"""

from __future__ import annotations

from pathlib import Path


def plot_generations(generations: list[dict], lineage: str, path: Path) -> Path:
    """One point per generation; promoted ones filled, rejected ones hollow."""
    import matplotlib  # imported when a chart is drawn: the bot starts without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not generations:
        raise ValueError(f"{lineage} has no generations yet")
    numbers = [g["number"] for g in generations]
    m = [g["metrics"] for g in generations]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(numbers, [x.get("accuracy", 0) for x in m], "o-", label="held-out pick accuracy")
    top.plot(numbers, [x.get("accuracy_base", 0) for x in m], "s--", label="base model on the same picks")
    top.set_ylim(0, 1.05)
    top.set_ylabel("accuracy")
    top.legend(loc="lower right")
    ratio = [x.get("distinct2", 0) / x["distinct2_base"] if x.get("distinct2_base") else 0 for x in m]
    bottom.plot(numbers, ratio, "o-", label="distinct-2 / base")
    bottom.plot(numbers, [x.get("kl_per_token", 0) for x in m], "^-", label="KL from base (nats/token)")
    bottom.set_xlabel("generation")
    bottom.set_xticks(numbers)
    bottom.legend(loc="upper left")
    for axis in (top, bottom):
        for g, x in zip(generations, numbers):
            if g["status"] != "promoted":
                axis.axvspan(x - 0.4, x + 0.4, color="red", alpha=0.12)
    fig.suptitle(f"{lineage}: generations (red bands: not promoted)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
