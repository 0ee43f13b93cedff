"""Generations, in one place: lineages, numbering, served names, promote, rollback, pruning, forgetting.

By default every user grows their own companion (lineage = the user id, e.g. "discord:1234");
with `training.lineage = "shared"` one lineage learns from everybody. A lineage is a chain of
generations gen-1, gen-2, ... (numbers never repeat, not even after a forget); one of them, or the
base model, is served. The rows live in SQLite (bot/store.py), the adapter folders under
`<data_dir>/generations/<lineage>/gen-0007/`; training/rollover.py makes new ones each night.

    promote(store, "discord:1234", 3)    # serve gen-3 (None: the base model)
    rollback(store, "discord:1234")      # serve the parent of the serving generation
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Settings

if TYPE_CHECKING:  # the store imports the naming below
    from bot.store import Store

SHARED = "shared"
GENERATION_FLOOR = "generation_floor"  # flag: the highest number any forgotten lineage reached
ADAPTER_ERROR = "adapter_error:"  # flag prefix + served adapter name: why it could not be loaded
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


def next_number(store: Store, settings: Settings, lineage: str) -> int:
    """Higher than any generation in the database or on disk (a crash can leave a folder without a row);
    a lineage without any starts above every number a forgotten lineage reached (never reused names)."""
    numbers = [g["number"] for g in store.generations(lineage)] or [int(store.flag(GENERATION_FLOOR) or 0)]
    folder = lineage_dir(settings, lineage)
    numbers += [int(p.name[4:]) for p in folder.glob("gen-*") if p.name[4:].isdigit()] if folder.exists() else []
    return max(numbers, default=0) + 1


def promote(store: Store, lineage: str, number: int | None) -> dict | None:
    """Serve generation `number` of `lineage` (None: the base model). Returns the generation row."""
    if number is None:
        store.set_serving(lineage, None)
        return None
    generation = next((g for g in store.generations(lineage) if g["number"] == number), None)
    if generation is None:
        raise GenerationError(f"{lineage} has no generation {number}")
    if not (Path(generation["path"]) / "adapter_config.json").exists():
        raise GenerationError(f"generation {number} of {lineage} has no adapter on disk ({generation['path']})")
    store.set_serving(lineage, generation["id"])
    return generation


def rollback(store: Store, lineage: str, number: int | None = None) -> dict | None:
    """Serve `number`, or by default the parent of the serving generation (the base if it has none)."""
    if number is None:
        serving = store.serving(lineage)
        if serving is None:
            raise GenerationError(f"{lineage} already serves the base model")
        parent = store.generation(serving["parent_id"]) if serving["parent_id"] else None
        number = parent["number"] if parent else None
    return promote(store, lineage, number)


def prune(store: Store, settings: Settings, lineage: str) -> None:
    """Keep the newest generation folders (and always the serving one and its parent)."""
    serving = store.serving(lineage)
    keep = {serving["id"], serving["parent_id"]} if serving else set()
    for generation in store.generations(lineage)[: -settings.training.keep_generations]:
        if generation["id"] not in keep and Path(generation["path"]).exists():
            shutil.rmtree(generation["path"], ignore_errors=True)
