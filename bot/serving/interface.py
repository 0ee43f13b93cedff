"""What every generator offers the dialogue engine, and what a request names: no torch here.

    samples = await generator.sample(prompt, 3, settings.sampling, ["\\n"], AdapterRef(name, path))
    samples = await generator.sample(prompt, 8, ..., unconditional=prompt.unconditional)  # with signals

`prefix` (optional) is the start of the prompt that many chats share, the persona and its example
dialogue; a generator may reuse its KV cache across requests. `unconditional` (optional) is the prompt
with no conversation in it (`Prompt.unconditional`): given it, the samples carry the model's signals.
`sample` is awaited from the event loop and never blocks it. The adapter a request uses is fixed when the request is made (an `AdapterRef`, or
None for the base model), so a promotion in the middle of a reply never changes the weights it is
sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from bot.config import SamplingSettings
from bot.generations import parse_adapter_name


OPENING = 8  # relevance is read on a reply's first tokens (bot/serving/signals.py), and pruning (`Pruning`)
# rates replies there: a reply's opening says whether it answers what was said


@dataclass(frozen=True)
class Sample:
    """One sampled continuation, already cut at the first stop string.

    Asked with `unconditional`, a generator also says what the model thought of it (bot/ranking.py ranks
    by these); they cover the reply's own tokens (not the stop that ended it), read from the model's own
    distribution (before temperature, top-p, minimum length and repetition penalty):
    """

    text: str
    new_tokens: int
    hit_stop: bool
    logprob: float | None = None        # mean log-probability per token, given the whole prompt
    relevance: float | None = None      # over the reply's opening (its first OPENING tokens):
    # the mean log-prob given the whole prompt minus the same given the persona alone (no conversation)
    features: tuple[float, ...] = ()    # the model's mean last hidden state over those tokens (local generator)
    pruned: bool = False                # dropped after its opening (`Pruning`): a partial reply, never offered


@dataclass(frozen=True)
class Pruning:
    """Best-of-N with early rejection: after `after` new tokens, only the `keep` best unfinished replies of
    a request go on to their end; `score` rates the partial replies (with their signals, higher is better).
    Most of N's cost is in the rows that run long, so the N rows cost about `keep` rows' time after that."""

    after: int
    keep: int
    score: Callable[[list[Sample]], list[float | None]]


@dataclass(frozen=True)
class AdapterRef:
    """One generation's LoRA adapter: its never-reused served name and its folder (peft format)."""

    name: str
    path: Path

    @property
    def lineage(self) -> str | None:
        """Whose generation this is, as served names say it (`user-telegram-42`); None for another name."""
        parsed = parse_adapter_name(self.name)
        return parsed[0] if parsed else None

    @property
    def number(self) -> int | None:
        """The generation's number within its lineage (later generations have higher numbers)."""
        parsed = parse_adapter_name(self.name)
        return parsed[1] if parsed else None


class AdapterError(Exception):
    """An adapter folder is missing, corrupt or incompatible; the request can fall back to the base."""


class Generator(Protocol):
    signals: bool  # whether samples asked with `unconditional` carry logprob, relevance (and features)

    async def sample(self, prompt: str, n: int, sampling: SamplingSettings, stop: list[str],
                     adapter: AdapterRef | None, prefix: str = "", unconditional: str | None = None,
                     pruning: Pruning | None = None) -> list[Sample]: ...

    def stats(self) -> dict: ...

    def pending(self) -> int: ...     # requests queued or running

    async def evict_lineage(self, lineage: str) -> None: ...  # a user forgot: drop `user-<lineage>` weights

    def close(self) -> None: ...
