"""KV caches of the local worker: prompt prefixes computed once and reused, and per-request caches
put together into one batch cache.

    prefixes = PrefixCache(64)
    cache = prefixes.copy_of(adapter, persona_prefix, compute)   # computed on a miss, a private copy always
    batch = left_padded_batch([cache_1, cache_2, None], width)    # one cache for a left-padded batch
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable

import torch

from bot.serving.interface import AdapterRef


class PrefixCache:
    """KV caches of shared prompt starts (a persona and its example dialogue), one per adapter and
    prefix, the least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._caches: OrderedDict[tuple[AdapterRef | None, str], object] = OrderedDict()
        self.hits = self.misses = 0

    def copy_of(self, adapter: AdapterRef | None, prefix: str, compute: Callable[[], object]) -> object:
        """A private copy of the KV cache of `prefix` on `adapter` (None: the base model); `compute`
        makes it when it is not cached."""
        key = (adapter, prefix)
        cache = self._caches.get(key)
        if cache is None:
            self.misses += 1
            cache = self._caches[key] = compute()
            while len(self._caches) > self.capacity:
                self._caches.popitem(last=False)
        else:
            self.hits += 1
            self._caches.move_to_end(key)
        return copy.deepcopy(cache)

    def drop_lineage(self, lineage: str) -> None:
        """Forget every prefix computed on an adapter of `lineage` (`user-<lineage>`)."""
        for key in [key for key in self._caches if key[0] is not None and key[0].lineage == lineage]:
            del self._caches[key]

    def adapters(self) -> list[str]:
        """The names of the adapters that have cached prefixes, sorted."""
        return sorted({adapter.name for adapter, _ in self._caches if adapter is not None})


def left_padded_batch(caches: list, width: int):
    """One batch KV cache from per-request caches of different lengths, left-padded to `width`
    positions the way a batched prefill of left-padded prompts stores them (the attention mask hides
    the padding). A request with nothing to prefill (a one-token prompt) is None: all padding."""
    template = next(c for c in caches if c is not None)
    for index, layer in enumerate(template.layers):
        sliding = getattr(layer, "sliding_window", None)
        stored = min(width, sliding - 1) if sliding else width  # a sliding layer keeps its last window only
        keys, values = [], []
        for cache in caches:
            if cache is None:
                k = layer.keys.new_zeros(*layer.keys.shape[:2], 0, layer.keys.shape[-1])
                v = layer.values.new_zeros(*layer.values.shape[:2], 0, layer.values.shape[-1])
            else:
                k, v = cache.layers[index].keys, cache.layers[index].values
            pad = stored - k.shape[-2]
            keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        layer.keys, layer.values = torch.cat(keys), torch.cat(values)
        if sliding:
            layer.cumulative_length = width
    return template
