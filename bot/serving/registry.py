"""The books of a generator's adapters: which are resident, which requests hold them, which may go.

One set of rules for the local worker's slots (bot/serving/slots.py) and for the adapters this bot
loads on a vLLM server (bot/serving/vllm.py):

- **Held adapters stay.** A request holds its adapter until its reply is done (`hold`, `release`);
  an adapter some request holds is never dropped.
- **Least recently used goes first** when room is needed (`make_room`); with every adapter held, the
  registry stays over its capacity for a while rather than cutting a reply short.
- **Supersession.** When a generation becomes resident (`add`), the older resident generations of its
  lineage (with `supersede_newer`, all the others) retire: each is dropped at once when idle, else as
  soon as its last request is released.
- **Forgetting** a lineage (`retire_lineage`) retires all of its generations the same way.

The registry only keeps the books: every method that lets adapters go returns their names, and the
caller frees what they held (a slot's weights, a load on the server).
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from bot.serving.interface import AdapterRef


class AdapterRegistry:
    """Resident adapters by served name in least-recently-used order, with the requests holding each."""

    def __init__(self, capacity: int, *, supersede_newer: bool = False):
        """At most `capacity` adapters stay resident while room can be made.

        `supersede_newer`: a generation that becomes resident also retires the *newer* resident
        generations of its lineage (the local worker loads adapters one at a time in request order,
        so the one loaded last is the one its lineage serves, after a rollback too). Without it only
        older generations retire (loads on a vLLM server run concurrently and may finish in any order,
        so the generation number decides).
        """
        self.capacity = capacity
        self.supersede_newer = supersede_newer
        self._resident: OrderedDict[str, AdapterRef] = OrderedDict()  # least recently used first
        self._holds: Counter[str] = Counter()   # requests queued or running, per adapter name
        self._retiring: set[str] = set()        # superseded or forgotten: to go once no request holds them

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def names(self) -> list[str]:
        """The resident adapters, least recently used first."""
        return list(self._resident)

    def idle(self) -> list[str]:
        """The resident adapters no request holds, least recently used first."""
        return [name for name in self._resident if not self.is_held(name)]

    def is_held(self, name: str) -> bool:
        """Whether some request holds `name`."""
        return self._holds[name] > 0

    def holds(self) -> dict[str, int]:
        """How many requests hold each adapter that some request holds (resident or still loading)."""
        return {name: count for name, count in self._holds.items() if count}

    def touch(self, name: str) -> None:
        """Mark a resident adapter as the most recently used (nothing happens for another name)."""
        if name in self._resident:
            self._resident.move_to_end(name)

    def hold(self, name: str) -> None:
        """A request will use `name` (it need not be resident yet)."""
        self._holds[name] += 1

    def release(self, name: str) -> list[str]:
        """A request on `name` is done; returns [name] when that was the last one of a retiring adapter."""
        self._holds[name] -= 1
        if self._holds[name] > 0:
            return []
        del self._holds[name]
        if name in self._retiring and name in self._resident:
            self._drop(name)
            return [name]
        return []

    def add(self, adapter: AdapterRef) -> list[str]:
        """`adapter` is resident now, the most recently used; the generations it supersedes retire.
        Returns those dropped at once (the others go when released)."""
        self._resident[adapter.name] = adapter
        self._resident.move_to_end(adapter.name)
        return self._retire([other.name for other in self._resident.values() if self._supersedes(adapter, other)])

    def retire_lineage(self, lineage: str) -> list[str]:
        """Retire every resident generation of `lineage` (`user-<lineage>`); returns those dropped at once."""
        return self._retire([adapter.name for adapter in self._resident.values() if adapter.lineage == lineage])

    def make_room(self, reserve: int = 0) -> list[str]:
        """Drop least recently used idle adapters until `reserve` more fit within the capacity; returns
        those dropped (fewer than needed when the others are all held)."""
        dropped = []
        while len(self._resident) + reserve > self.capacity:
            idle = self.idle()
            if not idle:
                break
            self._drop(idle[0])
            dropped.append(idle[0])
        return dropped

    def discard(self, name: str) -> None:
        """`name` is no longer resident, through no decision of the registry (the server lost it and it
        is being loaded again); a retirement still pending applies again once it is back."""
        self._resident.pop(name, None)

    def _supersedes(self, new: AdapterRef, old: AdapterRef) -> bool:
        if old.name == new.name or new.lineage is None or old.lineage != new.lineage:
            return False
        return self.supersede_newer or old.number < new.number

    def _retire(self, names: list[str]) -> list[str]:
        dropped = []
        for name in names:
            if self.is_held(name):
                self._retiring.add(name)
            else:
                self._drop(name)
                dropped.append(name)
        return dropped

    def _drop(self, name: str) -> None:
        del self._resident[name]
        self._retiring.discard(name)
