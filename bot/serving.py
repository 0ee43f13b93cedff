"""Serving replies for many users at once, each on their own adapter generation.

    generator = LocalGenerator.load(settings.model, settings.serving)   # or VllmGenerator (bot/vllm_backend.py)
    samples = await generator.sample(prompt, 3, settings.sampling, ["\\n"], AdapterRef(name, path))

`prefix` (optional) is the start of the prompt that many chats share, the persona and its example
dialogue: its KV cache is computed once per adapter and reused. Every generator has the same
interface: `sample` is awaited from the event loop and never blocks it; the adapter a request uses is
fixed when the request is made (an `AdapterRef`, or None for the base model), so a promotion in the
middle of a reply never changes the weights it is sampled with.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import json
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors.torch import load_file
from torch import nn

from bot.config import ModelSettings, SamplingSettings, ServingSettings
from bot.lineage import parse_adapter_name
from bot.model import ModelBackend, ModelError, Sample
from bot.sampling import generate_kwargs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterRef:
    """One generation's LoRA adapter: its never-reused served name and its folder (peft format)."""

    name: str
    path: Path


class AdapterError(Exception):
    """An adapter folder is missing, corrupt or incompatible; the request can fall back to the base."""


class Generator(Protocol):
    async def sample(self, prompt: str, n: int, sampling: SamplingSettings, stop: list[str],
                     adapter: AdapterRef | None, prefix: str = "") -> list[Sample]: ...

    def stats(self) -> dict: ...

    def pending(self) -> int: ...     # requests queued or running

    async def evict_lineage(self, lineage: str) -> None: ...  # a user forgot: drop `user-<lineage>` weights

    def close(self) -> None: ...


# -- many LoRA adapters in one batch ------------------------------------------------------------------

class LoraRouter:
    """Which adapter slot each row of the running batch uses; read by every MultiLoraLinear."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None
        self._versions = itertools.count(1)

    def set(self, row_slots: list[int], device: torch.device, merged: frozenset[int] = frozenset(),
            rank: int | None = None) -> None:
        """`row_slots[i]` is the slot of batch row i, or -1 for the base model; `merged` are the slots
        whose weights are folded into a copy of the layers (used when a batch needs that slot alone);
        `rank` is the highest rank among the slots (the banks' columns beyond it are zero and not read)."""
        active = {s for s in row_slots if s >= 0}
        if not active:
            self.plan = None
        elif len(active) == 1 and -1 not in row_slots:  # every row on one adapter
            slot = active.pop()
            self.plan = BatchPlan(next(self._versions), slot=slot, merged=slot if slot in merged else None, rank=rank)
        else:
            # A request's candidates are consecutive rows on one slot. Rows are split into groups of
            # the largest size that divides every run of equal slots, so each group reads its
            # adapter's weights once (per row, a request of 3 candidates would read them 3 times).
            size = math.gcd(*(len(list(run)) for _, run in itertools.groupby(row_slots)))
            # -1 indexes each bank's last slot, which stays zero: the base model
            self.plan = BatchPlan(next(self._versions), groups=torch.tensor(row_slots[::size], device=device),
                                  rank=rank)

    def clear(self) -> None:
        self.plan = None


@dataclass
class BatchPlan:
    version: int
    slot: int | None = None             # every row uses this slot ...
    merged: int | None = None           # ... whose merged layers are ready
    groups: torch.Tensor | None = None  # or: the slot of each group of consecutive rows (-1: the base model)
    rank: int | None = None             # bank columns read (None: all)


class MultiLoraLinear(nn.Module):
    """A linear layer plus a bank of LoRA slots; each batch row adds the update of its own slot.

    For a mixed batch, each row group's A and B are gathered once per batch into [groups, in, r] and
    [groups, r, out] (r: the highest rank among the batch's adapters, not the bank's), so a step costs
    two batched matmuls (added in place to the base output) whatever the mix of users, instead of a
    loop over adapters. A batch that needs one adapter alone runs on a merged copy of the layer when
    one is ready (`merged`, filled by `AdapterCache.merge`): then the adapter costs nothing per token.
    """

    def __init__(self, base: nn.Module, slots: int, rank: int, router: LoraRouter):
        super().__init__()
        self.base = base
        self.router = router
        # a dynamic int8 layer has a packed weight; its inputs and outputs stay float32 on the CPU. On
        # the CPU the banks are float32 whatever the weights: small bfloat16 batched matmuls are slower there.
        dtype, device = (base.weight.dtype, base.weight.device) if isinstance(base, nn.Linear) else \
            (torch.float32, torch.device("cpu"))
        if device.type == "cpu":
            dtype = torch.float32
        # one slot more than can be loaded: the last one stays zero and serves rows on the base model
        self.register_buffer("lora_a", torch.zeros(slots + 1, base.in_features, rank, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots + 1, rank, base.out_features, dtype=dtype, device=device),
                             persistent=False)
        self._version = 0
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None
        self.merged: dict[int, nn.Module] = {}  # slot -> this layer with that slot's update folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.router.plan
        if plan is None:
            return self.base(x)
        if plan.merged is not None:
            return self.merged[plan.merged](x)
        y = self.base(x)  # a new tensor: the update is added to it in place (cast to its dtype)
        x, rank = x.to(self.lora_a.dtype), plan.rank
        if plan.groups is None:
            return y.add_((x @ self.lora_a[plan.slot, :, :rank]) @ self.lora_b[plan.slot, :rank])
        if self._version != plan.version:  # a mixed batch reads only the ranks its adapters use
            self._a, self._b = self.lora_a[:, :, :rank][plan.groups], self.lora_b[:, :rank][plan.groups]
            self._version = plan.version
        x = x.reshape(len(plan.groups), -1, x.shape[-1])
        if y.dtype == self._b.dtype:  # float32 outputs (int8 layers): the update is added by the matmul itself
            y.view(len(plan.groups), -1, y.shape[-1]).baddbmm_(torch.bmm(x, self._a), self._b)
            return y
        return y.add_(torch.bmm(torch.bmm(x, self._a), self._b).view(y.shape))


def merged_layer(base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """A copy of `base` with the LoRA update x·A·B folded into its weight (dynamic int8 layers are
    quantised again the way `quantize_dynamic` does it: symmetric, per tensor or per channel)."""
    delta = (a.float() @ b.float()).T  # [out, in]
    if isinstance(base, nn.Linear):
        merged = torch.nn.utils.skip_init(nn.Linear, base.in_features, base.out_features, bias=base.bias is not None,
                                          device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_((base.weight.float() + delta.to(base.weight.device)).to(base.weight.dtype))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged
    old = base.weight()
    weight = old.dequantize() + delta
    if old.qscheme() in (torch.per_channel_symmetric, torch.per_channel_affine):
        scales = (weight.abs().amax(dim=1) / 127.5).clamp(min=1e-8).double()
        qweight = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
    else:
        qweight = torch.quantize_per_tensor(weight, max(weight.abs().max().item() / 127.5, 1e-8), 0, torch.qint8)
    merged = torch.ao.nn.quantized.dynamic.Linear(base.in_features, base.out_features, dtype=torch.qint8)
    merged.set_weight_bias(qweight, base.bias())
    return merged


def install_multi_lora(model: nn.Module, slots: int, rank: int) -> tuple[LoraRouter, dict[str, MultiLoraLinear]]:
    """Wrap every linear layer of the decoder blocks (not the LM head) with a slot bank, in place."""
    router = LoraRouter()
    layers: dict[str, MultiLoraLinear] = {}
    linear = (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    for name, module in list(model.named_modules()):
        if isinstance(module, linear) and ".layers." in name:
            parent_name, _, attr = name.rpartition(".")
            wrapped = MultiLoraLinear(module, slots, rank, router)
            setattr(model.get_submodule(parent_name), attr, wrapped)
            layers[name] = wrapped
    if not layers:
        raise ModelError("found no decoder linear layers to serve LoRA adapters on")
    return router, layers


def _lineage_of(name: str) -> str | None:
    parsed = parse_adapter_name(name)
    return parsed[0] if parsed else None


class AdapterCache:
    """A bounded set of resident adapters in slots, least recently used evicted first.

    A slot in use by a queued or running request (refs > 0) is never evicted or overwritten; when a
    newer generation of the same lineage arrives, the older one is freed as soon as its last reply is done.
    Only the model worker thread calls this.
    """

    def __init__(self, layers: dict[str, MultiLoraLinear], slots: int, rank: int, merged: int = 0):
        self.layers = layers
        self.rank = rank
        self.free = list(range(slots - 1, -1, -1))
        self.slot_of: OrderedDict[str, int] = OrderedDict()   # resident adapters, least recently used first
        self.rank_of_slot: dict[int, int] = {}                # the rank each loaded slot holds
        self.refs: Counter[str] = Counter()
        self.superseded: set[str] = set()
        self.max_merged = merged
        self.merged: OrderedDict[str, None] = OrderedDict()   # adapters with merged layers, oldest first
        self.merge_wanted: str | None = None                  # the adapter last used alone in a batch
        self.loads = self.evictions = self.merges = 0
        self.load_seconds = self.merge_seconds = 0.0

    def acquire(self, ref: AdapterRef) -> int:
        if ref.name in self.slot_of:
            self.slot_of.move_to_end(ref.name)
        else:
            slot = self._free_slot()
            try:
                self._load(ref, slot)
            except Exception:
                self.free.append(slot)
                raise
            self.slot_of[ref.name] = slot
            lineage = _lineage_of(ref.name)
            for other in list(self.slot_of):
                if other != ref.name and lineage and _lineage_of(other) == lineage:
                    self.superseded.add(other)
                    self._maybe_free(other)
        self.refs[ref.name] += 1
        return self.slot_of[ref.name]

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if self.refs[name] <= 0:
            del self.refs[name]
            self._maybe_free(name)

    def can_take(self, names: set[str]) -> bool:
        """Whether all of `names` can be resident at once next to the slots in use."""
        missing = [n for n in names if n not in self.slot_of]
        evictable = sum(1 for n in self.slot_of if self.refs[n] == 0 and n not in names)
        return len(missing) <= len(self.free) + evictable

    def evict_lineage(self, lineage: str) -> None:
        """Drop every adapter of a served lineage (each as soon as its replies in flight are done)."""
        for name in [n for n in self.slot_of if _lineage_of(n) == lineage]:
            self.superseded.add(name)
            self._maybe_free(name)

    def rank_of(self, slots: list[int]) -> int:
        """The highest rank among `slots` (-1, the base model, has none)."""
        return max((self.rank_of_slot[s] for s in slots if s >= 0), default=self.rank)

    def merged_slots(self) -> frozenset[int]:
        return frozenset(self.slot_of[name] for name in self.merged)

    def wants_merge(self) -> bool:
        name = self.merge_wanted
        return self.max_merged > 0 and name is not None and name in self.slot_of and name not in self.merged

    def merge(self, name: str) -> None:
        """Fold a resident adapter into merged copies of every layer (the oldest merged one is dropped
        beyond `max_merged`). Costs about one pass over the weights; the worker does it while idle."""
        started = time.perf_counter()
        slot = self.slot_of[name]
        while len(self.merged) >= self.max_merged:
            self._drop_merged(next(iter(self.merged)))
        with torch.no_grad():
            for layer in self.layers.values():
                layer.merged[slot] = merged_layer(layer.base, layer.lora_a[slot], layer.lora_b[slot])
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
                layer.merged.pop(slot, None)

    def _unload(self, name: str) -> int:
        self._drop_merged(name)
        self.superseded.discard(name)
        return self.slot_of.pop(name)

    def _maybe_free(self, name: str) -> None:
        if name in self.superseded and self.refs[name] == 0 and name in self.slot_of:
            slot = self._unload(name)
            with torch.no_grad():  # a forgotten user's weights do not stay behind in a free slot
                for layer in self.layers.values():
                    layer.lora_a[slot].zero_()
                    layer.lora_b[slot].zero_()
            self.free.append(slot)
            self.evictions += 1

    def _free_slot(self) -> int:
        if self.free:
            return self.free.pop()
        for name in self.slot_of:  # least recently used first
            if self.refs[name] == 0:
                self.evictions += 1
                return self._unload(name)
        raise AdapterError("every adapter slot is in use")  # callers check can_take first

    def _load(self, ref: AdapterRef, slot: int) -> None:
        started = time.perf_counter()
        weights = read_adapter(ref.path, self.rank, set(self.layers))
        self.rank_of_slot[slot] = max(a.shape[1] for a, _ in weights.values())
        with torch.no_grad():
            for name, layer in self.layers.items():
                a, b = weights.get(name, (None, None))
                layer.merged.pop(slot, None)
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                if a is not None:
                    r = a.shape[1]
                    layer.lora_a[slot, :, :r].copy_(a)
                    layer.lora_b[slot, :r, :].copy_(b)
                layer._version = 0  # batches planned before this load must gather their rows again
        self.loads += 1
        self.load_seconds += time.perf_counter() - started


def read_adapter(path: Path, max_rank: int, modules: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A peft LoRA folder as {module: (A [in, r], B·scale [r, out])}, checked against what can be served."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise AdapterError(f"adapter folder {path} is missing adapter_config.json or adapter_model.safetensors")
    try:
        config = json.loads(config_file.read_text())
        tensors = load_file(str(weights_file))
    except Exception as exc:
        raise AdapterError(f"adapter folder {path} cannot be read: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise AdapterError(f"{path}: only plain LoRA adapters can be served together (no DoRA)")
    rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    if rank > max_rank:
        raise AdapterError(f"{path}: rank {rank} is above serving.max_rank {max_rank}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
    weights = {}
    for module, pair in pairs.items():
        if module not in modules:
            raise AdapterError(f"{path}: adapts {module}, which this model cannot serve adapters on")
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{path}: {module} lacks half of its LoRA pair")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"{path}: {module} holds non-finite weights")
        weights[module] = (a.T.contiguous(), (b.T * scale).contiguous())
    if not weights:
        raise AdapterError(f"{path}: no LoRA weights found")
    return weights


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


# -- the local generator: one model worker, batches across users ----------------------------------

@dataclass
class _Request:
    prompt: str
    n: int
    sampling: SamplingSettings
    stop: tuple[str, ...]
    adapter: AdapterRef | None
    future: Future
    prefix: str = ""
    key: tuple = ()

    def __post_init__(self) -> None:
        s = self.sampling
        self.key = (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens, s.min_new_tokens,
                    self.stop)


class LocalGenerator:
    """Owns the model on one worker thread and samples queued requests in mixed batches.

    Requests with the same sampling settings that arrive within `batch_window_ms` of each other go
    into one generate call, whatever adapters they use (up to `max_batch_rows` sequences).

    Every parallel torch operation of a serving process should run on this one thread, loading
    included, so use `LocalGenerator.load(model_settings, serving)`: torch's OpenMP runtime (libgomp)
    keeps a team of threads per thread that ever ran a parallel operation, and once the teams hold
    more threads than there are cores, its threads stop spinning between operations and every small
    operation waits for them to wake (a batched LoRA matmul took 3x longer when the model had been
    loaded on the event loop's thread; bench/mixed_batch.py shows the effect on whole replies).
    """

    def __init__(self, backend: ModelBackend | Callable[[], ModelBackend], serving: ServingSettings):
        """`backend`, or a function that loads it on the worker thread (see `load`)."""
        self.serving = serving
        self._queue: deque[_Request] = deque()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # see `call`
        self._changed = threading.Condition()
        self._closed = False
        self.batches = self.rows = 0
        self._running = 0  # requests in the batch being generated
        self._prefixes: OrderedDict[tuple[str | None, str], object] = OrderedDict()  # (adapter, prefix) -> KV cache
        self._prefix_tokens = functools.lru_cache(maxsize=64)(self._tokenize_prefix)  # one per persona prompt
        self.prefix_hits = self.prefix_misses = 0
        ready: Future = Future()
        self._thread = threading.Thread(target=self._work, args=(backend, ready), name="banryeo-model", daemon=True)
        self._thread.start()
        ready.result()  # the worker's set-up error, if any, is raised here

    @classmethod
    def load(cls, model: ModelSettings, serving: ServingSettings) -> "LocalGenerator":
        """Load the model on the worker thread and serve it there; the backend is `generator.backend`."""
        return cls(lambda: ModelBackend.load(model), serving)

    def _set_up(self, backend: ModelBackend | Callable[[], ModelBackend]) -> None:
        self.backend = backend if isinstance(backend, ModelBackend) else backend()
        self.router, layers = install_multi_lora(self.backend.model, self.serving.max_adapters, self.serving.max_rank)
        self.cache = AdapterCache(layers, self.serving.max_adapters, self.serving.max_rank,
                                  self.serving.merged_adapters)

    async def sample(self, prompt: str, n: int, sampling: SamplingSettings, stop: list[str],
                     adapter: AdapterRef | None, prefix: str = "") -> list[Sample]:
        return await asyncio.wrap_future(self.submit(prompt, n, sampling, stop, adapter, prefix))

    def submit(self, prompt: str, n: int, sampling: SamplingSettings, stop: list[str],
               adapter: AdapterRef | None, prefix: str = "") -> Future:
        """Queue a request from any thread; the future holds its samples (or the error)."""
        request = _Request(prompt, n, sampling, tuple(stop), adapter, Future(), prefix)
        self._put(self._queue, request)
        return request.future

    def call(self, function: Callable[[], object]) -> Future:
        """Run `function` on the model's thread between batches (e.g. a benchmark's other torch work,
        which would otherwise start a second OpenMP team, see the class docstring)."""
        future: Future = Future()
        self._put(self._calls, (function, future))
        return future

    def _put(self, queue: deque, item: object) -> None:
        with self._changed:
            if self._closed:
                raise RuntimeError("the generator is closed")
            queue.append(item)
            self._changed.notify()

    def pending(self) -> int:
        return len(self._queue) + self._running

    async def evict_lineage(self, lineage: str) -> None:
        """Drop the lineage's adapters (slots, merged copies) and its cached prompt prefixes, on the worker."""
        def evict() -> None:
            self.cache.evict_lineage(lineage)
            for key in [k for k in self._prefixes if k[0] and _lineage_of(k[0]) == lineage]:
                del self._prefixes[key]
        await asyncio.wrap_future(self.call(evict))

    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "adapter_loads": self.cache.loads,
                "evictions": self.cache.evictions, "resident": list(self.cache.slot_of),
                "adapter_load_seconds": round(self.cache.load_seconds, 3), "queued": len(self._queue),
                "merged": list(self.cache.merged), "merges": self.cache.merges,
                "merge_seconds": round(self.cache.merge_seconds, 3),
                "prefix_hits": self.prefix_hits, "prefix_misses": self.prefix_misses,
                "prefix_adapters": sorted({adapter for adapter, _ in self._prefixes if adapter})}

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=30)
        for request in self._queue:
            request.future.cancel()
        for _, future in self._calls:
            future.cancel()

    # -- the worker ---------------------------------------------------------------------------------

    def _work(self, backend: ModelBackend | Callable[[], ModelBackend], ready: Future) -> None:
        try:
            self._set_up(backend)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while True:
            with self._changed:
                while not self._queue and not self._calls and not self._closed and not self.cache.wants_merge():
                    self._changed.wait()
                if self._closed:
                    return
                call = self._calls.popleft() if self._calls else None
                merge = None if self._queue else self.cache.merge_wanted
            if call is not None:
                function, future = call
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(function())
                    except BaseException as exc:
                        future.set_exception(exc)
                continue
            if merge is not None:  # idle: fold the adapter last used alone into merged layers
                self._merge(merge)
                continue
            with self._changed:
                deadline = time.monotonic() + self.serving.batch_window_ms / 1000
                while sum(r.n for r in self._queue) < self.serving.max_batch_rows and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._changed.wait(remaining)
                batch = self._take_batch()
                self._running = len(batch)
            try:
                self._run(batch)
            finally:
                self._running = 0

    def _merge(self, name: str) -> None:
        with self.backend.lock:
            try:
                self.cache.merge(name)
            except Exception:  # a merge is only a speed-up: the adapter keeps serving unmerged
                logger.exception("merging adapter %s failed", name)
                self.cache.merge_wanted = None

    def _take_batch(self) -> list[_Request]:
        """The oldest request plus every queued one that fits with it (same settings, rows, slots)."""
        first = self._queue.popleft()
        batch, rows = [first], first.n
        names = {first.adapter.name} if first.adapter else set()
        for request in list(self._queue):
            wanted = names | ({request.adapter.name} if request.adapter else set())
            if request.key != first.key or rows + request.n > self.serving.max_batch_rows \
                    or not self.cache.can_take(wanted):
                continue
            self._queue.remove(request)
            batch.append(request)
            rows += request.n
            names = wanted
        return batch

    def _run(self, batch: list[_Request]) -> None:
        batch = [r for r in batch if r.future.set_running_or_notify_cancel()]  # drop requests nobody awaits
        slots: dict[int, int] = {}
        acquired: list[str] = []
        for i, request in enumerate(batch):
            if request.adapter is None:
                continue
            try:
                slots[i] = self.cache.acquire(request.adapter)
                acquired.append(request.adapter.name)
            except AdapterError as exc:
                logger.error("adapter %s cannot be served: %s", request.adapter.name, exc)
                request.future.set_exception(exc)
        live = [(i, r) for i, r in enumerate(batch) if not r.future.done()]
        used = {r.adapter.name if r.adapter else None for _, r in live}
        if len(used) == 1 and None not in used:  # one adapter alone: worth merging when idle
            self.cache.merge_wanted = used.pop()
        try:
            if live:
                results = self._generate([r for _, r in live], [slots.get(i, -1) for i, _ in live])
                for (_, request), samples in zip(live, results):
                    request.future.set_result(samples)
        except Exception as exc:  # a failed batch fails its requests, never the worker
            logger.exception("generation failed")
            for _, request in live:
                if not request.future.done():
                    request.future.set_exception(exc)
        finally:
            for name in acquired:
                self.cache.release(name)

    def _prefill(self, requests: list[_Request], request_slots: list[int], ids: torch.Tensor, mask: torch.Tensor):
        """The KV cache of every prompt but its last token, left-padded like `ids` (one row per request).

        Each request is prefilled on its own, on its own adapter; the shared prefix (persona and
        examples) comes from the prefix cache when it is there, so only the conversation is computed.
        """
        caches = []
        for row, (request, slot) in enumerate(zip(requests, request_slots)):
            context = ids[row, :-1][mask[row, :-1].bool()]
            self._route([slot])
            start, cache = self._cached_prefix(request, context)
            if start < len(context):
                cache = self._forward(context[start:], start, cache)
            caches.append(cache)
        return left_padded_batch(caches, ids.shape[1] - 1)

    def _route(self, row_slots: list[int]) -> None:
        """Point every MultiLoraLinear at these rows' slots (merged copies and ranks as the cache has them)."""
        self.router.set(row_slots, self.backend.model.device, self.cache.merged_slots(),
                        self.cache.rank_of(row_slots))

    def _cached_prefix(self, request: _Request, context: torch.Tensor) -> tuple[int, object]:
        """(tokens covered, a private copy of their KV cache) for the request's shared prefix, or (0, None)."""
        if not request.prefix or not self.serving.prefix_cache:
            return 0, None
        tokens = self._prefix_tokens(request.prefix).to(context.device)
        # usable only if the prompt's own tokens start with these (checked, never assumed)
        if not 0 < len(tokens) < len(context) or not torch.equal(context[:len(tokens)], tokens):
            return 0, None
        key = (request.adapter.name if request.adapter else None, request.prefix)
        cache = self._prefixes.get(key)
        if cache is None:
            self.prefix_misses += 1
            cache = self._prefixes[key] = self._forward(tokens, 0, None)
            while len(self._prefixes) > self.serving.prefix_cache:
                self._prefixes.popitem(last=False)
        else:
            self.prefix_hits += 1
            self._prefixes.move_to_end(key)
        return len(tokens), copy.deepcopy(cache)

    def _tokenize_prefix(self, prefix: str) -> torch.Tensor:
        """All but the prefix's last token, which may merge with what follows it in the whole prompt."""
        return self.backend.tokenizer(prefix, add_special_tokens=not self.backend.use_chat_template,
                                      return_tensors="pt").input_ids[0, :-1]

    def _forward(self, tokens: torch.Tensor, start: int, cache):
        """Extend `cache` (None: a new one) by `tokens`, which sit at positions start, start+1, ...

        Only the decoder runs: a prompt's logits are never used, and the LM head is a large part of
        the weights of a small model (over half of the embedded one's, read once per call)."""
        positions = torch.arange(start, start + len(tokens), device=tokens.device)[None]
        model = self.backend.model
        decoder = model.get_decoder()
        head = {"logits_to_keep": 1} if decoder is model else {}  # a model with no separate decoder
        output = decoder(input_ids=tokens[None], position_ids=positions, cache=cache, use_cache=True, **head)
        return output.get("cache", output.get("past_key_values"))  # named `cache` since transformers 5.x

    @torch.inference_mode()
    def _generate(self, requests: list[_Request], request_slots: list[int]) -> list[list[Sample]]:
        backend, tokenizer = self.backend, self.backend.tokenizer
        row_slots = [slot for r, slot in zip(requests, request_slots) for _ in range(r.n)]
        inputs = tokenizer([r.prompt for r in requests], return_tensors="pt", padding=True,
                           add_special_tokens=not backend.use_chat_template).to(backend.model.device)
        s, stop = requests[0].sampling, list(requests[0].stop)
        kwargs = generate_kwargs(s, tokenizer, stop)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        rows = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.n)], device=ids.device)
        with backend.lock:
            try:
                if backend._generator_seed is not None:
                    torch.manual_seed(backend._generator_seed)
                # The prompt is prefilled once per request, not once per candidate: the cache is then
                # copied to each of the request's rows and generate goes on from the last prompt token.
                if ids.shape[1] > 1:
                    cache = self._prefill(requests, request_slots, ids, mask)
                    cache.batch_select_indices(rows)
                    kwargs["cache"] = cache
                self._route(row_slots)
                output = backend.model.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)
            finally:
                self.router.clear()
        self.batches += 1
        self.rows += len(row_slots)
        new_tokens = output[:, ids.shape[1]:]
        samples = [backend.decode_sample(row, stop) for row in new_tokens]
        results, start = [], 0
        for request in requests:
            results.append(samples[start:start + request.n])
            start += request.n
        return results
