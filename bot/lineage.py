"""Lineages: whose picks train which chain of generations, and how a generation is named when served.

By default every user grows their own companion (lineage = the user id, e.g. "discord:1234");
with `training.lineage = "shared"` one lineage learns from everybody.
"""

from __future__ import annotations

import re

from bot.config import Settings

SHARED = "shared"
RETRAIN_FROM_BASE = "retrain_from_base:"  # flag prefix + lineage: the next night must not continue the adapter


class GenerationError(ValueError):
    """An admin asked for a generation that does not exist or cannot be served."""


def lineage_of(user_id: str, settings: Settings) -> str:
    return SHARED if settings.training.lineage == "shared" else user_id


def adapter_name(generation: dict) -> str:
    """The served name of a generation, `user-<lineage>-gen-<n>` (e.g. user-telegram-42-gen-3).

    Generation numbers only grow within a lineage, so a name never stands for two different weights.
    """
    lineage = re.sub(r"[^A-Za-z0-9_]+", "-", generation["lineage"]).strip("-")
    return f"user-{lineage}-gen-{generation['number']}"
