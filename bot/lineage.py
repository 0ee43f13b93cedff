"""Lineages: whose picks train which chain of generations, and how a generation is named when served.

By default every user grows their own companion (lineage = the user id, e.g. "discord:1234");
with `training.lineage = "shared"` one lineage learns from everybody.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from bot.config import Settings

SHARED = "shared"
RETRAIN_FROM_BASE = "retrain_from_base:"  # flag prefix + lineage: the next night must not continue the adapter


class GenerationError(ValueError):
    """An admin asked for a generation that does not exist or cannot be served."""


def lineage_of(user_id: str, settings: Settings) -> str:
    return SHARED if settings.training.lineage == "shared" else user_id


def lineage_dir(settings: Settings, lineage: str) -> Path:
    """Where a lineage's generation folders live (gen-0001, gen-0002, ...)."""
    return settings.storage.generations_dir / re.sub(r"[^A-Za-z0-9_-]", "-", lineage)


def drop_examples_from(metadata: Path) -> None:
    """Remove the sampled example replies from a generation's metadata.json (see Store.drop_examples)."""
    try:
        data = json.loads(metadata.read_text())
    except (OSError, ValueError):
        return
    if "examples" in data.get("metrics", {}):
        del data["metrics"]["examples"]
        metadata.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=str))


def served_lineage(lineage: str) -> str:
    """The part of a served adapter name that says whose it is: `user-<lineage>` (e.g. user-telegram-42)."""
    return "user-" + re.sub(r"[^A-Za-z0-9_]+", "-", lineage).strip("-")


def adapter_name(generation: dict) -> str:
    """The served name of a generation, `user-<lineage>-gen-<n>` (e.g. user-telegram-42-gen-3).

    Numbers only grow within a lineage, also across a forget (Store.forget_lineage), so a name never
    stands for two different weights.
    """
    return f"{served_lineage(generation['lineage'])}-gen-{generation['number']}"


GENERATION_NAME = re.compile(r"^(?P<lineage>.+)-gen-(?P<number>\d+)$")


def parse_adapter_name(name: str) -> tuple[str, int] | None:
    """`user-telegram-42-gen-3` -> ("user-telegram-42", 3); None for names of no generation."""
    match = GENERATION_NAME.match(name)
    return (match["lineage"], int(match["number"])) if match else None


def forget_generations(store, settings: Settings, user_id: str) -> None:
    """The generation side of a forget (after `store.forget_user`): the user's own lineage goes (rows,
    folders, partial ones, error flags), also after a switch to the shared lineage; a shared lineage they
    taught starts its next night from the base and keeps no sampled examples that may continue their chats."""
    store.forget_lineage(user_id)
    shutil.rmtree(lineage_dir(settings, user_id), ignore_errors=True)
    lineage = lineage_of(user_id, settings)
    if lineage != user_id:
        store.set_flag(RETRAIN_FROM_BASE + lineage, str(time.time()))  # when: see training/rollover.py
        store.drop_examples(lineage)
        for metadata in lineage_dir(settings, lineage).glob("gen-*/metadata.json"):
            drop_examples_from(metadata)
