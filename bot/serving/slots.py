"""The local worker's adapter slots: which adapter sits in which slot of the MultiLoraLinear banks.

    cache = AdapterCache(layers, slots=16, rank=16, merged=2)
    slot = cache.acquire(ref)         # loads the folder into a slot when it is not resident
    ...                               # batches route the request's rows to `slot`
    cache.release(ref.name)

Which adapters stay, and for how long, is the registry's business (bot/serving/registry.py): least
recently used out, never one a running request holds, replaced generations freed once their last
reply is done. This cache writes and zeroes the slots that follows from, and keeps the merged
copies of adapters that batches use alone. Only the model worker thread calls it.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from bot.serving.interface import AdapterError, AdapterRef
from bot.serving.multi_lora import MultiLoraLinear, read_adapter
from bot.serving.registry import AdapterRegistry


class AdapterCache:
    """A bounded set of resident adapters in slots, least recently used evicted first.

    A slot in use by a queued or running request is never evicted or overwritten; when another
    generation of the same lineage is loaded, the one it replaces is freed as soon as its last reply is done.
    """

    def __init__(self, layers: dict[str, MultiLoraLinear], slots: int, rank: int, merged: int = 0):
        self.layers = layers
        self.rank = rank
        # the worker loads in request order: the generation loaded last is the one its lineage serves
        self.registry = AdapterRegistry(slots, supersede_newer=True)
        self.free = list(range(slots - 1, -1, -1))             # zeroed slots, the lowest taken first
        self.slot_of: dict[str, int] = {}                      # resident adapter -> its slot
        self.rank_of_slot: dict[int, int] = {}                 # the rank each loaded slot holds
        self.max_merged = merged
        self.merged: OrderedDict[str, None] = OrderedDict()   # adapters with merged layers, oldest first
        self.merge_wanted: str | None = None                  # the adapter last used alone in a batch
        self.loads = self.evictions = self.merges = 0
        self.load_seconds = self.merge_seconds = 0.0

    def acquire(self, ref: AdapterRef) -> int:
        """The slot of `ref`, loaded first when it is not resident; held until `release`."""
        if ref.name in self.registry:
            self.registry.touch(ref.name)
        else:
            slot = self._free_slot()
            try:
                self._load(ref, slot)
            except Exception:
                self.free.append(slot)
                raise
            self.slot_of[ref.name] = slot
            self._unload(self.registry.add(ref))
        self.registry.hold(ref.name)
        return self.slot_of[ref.name]

    def release(self, name: str) -> None:
        self._unload(self.registry.release(name))

    def can_take(self, names: set[str]) -> bool:
        """Whether all of `names` can be resident at once next to the slots in use."""
        missing = [n for n in names if n not in self.registry]
        evictable = sum(1 for n in self.registry.idle() if n not in names)
        return len(missing) <= len(self.free) + evictable

    def evict_lineage(self, lineage: str) -> None:
        """Drop every adapter of a served lineage (each as soon as its replies in flight are done)."""
        self._unload(self.registry.retire_lineage(lineage))

    def rank_of(self, slots: list[int]) -> int:
        """The highest rank among `slots` (-1, the base model, has none)."""
        return max((self.rank_of_slot[s] for s in slots if s >= 0), default=self.rank)

    def merged_slots(self) -> frozenset[int]:
        return frozenset(self.slot_of[name] for name in self.merged)

    def wants_merge(self) -> bool:
        name = self.merge_wanted
        return self.max_merged > 0 and name is not None and name in self.registry and name not in self.merged

    def merge(self, name: str) -> None:
        """Fold a resident adapter into merged copies of every layer (the oldest merged one is dropped
        beyond `max_merged`). Costs about one pass over the weights; the worker does it while idle."""
        started = time.perf_counter()
        slot = self.slot_of[name]
        while len(self.merged) >= self.max_merged:
            self._drop_merged(next(iter(self.merged)))
        for layer in self.layers.values():
            layer.merge_slot(slot)
        self.merged[name] = None
        if self.merge_wanted == name:
            self.merge_wanted = None
        self.merges += 1
        self.merge_seconds += time.perf_counter() - started

    def _drop_merged(self, name: str) -> None:
        if name in self.merged:
            del self.merged[name]
            slot = self.slot_of[name]
            for layer in self.layers.values():
                layer.unmerge_slot(slot)

    def _unload(self, names: list[str]) -> None:
        """Free the slots of adapters the registry let go, zeroed: a forgotten user's weights do not
        stay behind in a free slot."""
        for name in names:
            self._drop_merged(name)
            slot = self.slot_of.pop(name)
            for layer in self.layers.values():
                layer.clear_slot(slot)
            self.free.append(slot)
            self.evictions += 1

    def _free_slot(self) -> int:
        if not self.free:  # evict the least recently used adapter no request holds
            self._unload(self.registry.make_room(reserve=1))
        if not self.free:
            raise AdapterError("every adapter slot is in use")  # callers check can_take first
        return self.free.pop()

    def _load(self, ref: AdapterRef, slot: int) -> None:
        started = time.perf_counter()
        weights = read_adapter(ref.path, self.rank, set(self.layers))
        self.rank_of_slot[slot] = max(a.shape[1] for a, _ in weights.values())
        for name, layer in self.layers.items():
            layer.load_slot(slot, *weights.get(name, (None, None)))
        self.loads += 1
        self.load_seconds += time.perf_counter() - started
