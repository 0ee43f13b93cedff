"""Lineages: whose picks train which chain of generations, and how a generation is named when served.

By default every user grows their own companion (lineage = the user id, e.g. "discord:1234");
with `training.lineage = "shared"` one lineage learns from everybody.
"""

from __future__ import annotations

from bot.config import Settings

SHARED = "shared"


class GenerationError(ValueError):
    """An admin asked for a generation that does not exist or cannot be served."""


def lineage_of(user_id: str, settings: Settings) -> str:
    return SHARED if settings.training.lineage == "shared" else user_id


def adapter_name(generation: dict) -> str:
    """A name never reused for different weights: lineage plus generation number."""
    return f"{generation['lineage']}/gen-{generation['number']}"
