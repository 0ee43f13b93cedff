"""The local generator: one model worker thread that samples queued requests of many users in mixed batches.

    generator = LocalGenerator.load(settings.model, settings.serving)
    samples = await generator.sample(prompt, 3, settings.sampling, ["\\n"], AdapterRef(name, path), prefix)

Each request's adapter is loaded into a slot of the multi-LoRA layers (bot/serving/multi_lora.py,
bot/serving/slots.py); its shared prompt prefix comes from the prefix cache (bot/serving/kv_cache.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Callable

import torch

from bot.config import ModelSettings, SamplingSettings, ServingSettings
from bot.model import ModelBackend, completion_start
from bot.sampling import generate_kwargs
from bot.serving.interface import OPENING, AdapterError, AdapterRef, Pruning, Sample
from bot.serving.kv_cache import PrefixCache, left_padded_batch
from bot.serving.multi_lora import install_multi_lora
from bot.serving.signals import SignalRecorder, reply_tokens
from bot.serving.slots import AdapterCache

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    prompt: str
    n: int
    sampling: SamplingSettings
    stop: tuple[str, ...]
    adapter: AdapterRef | None
    future: Future
    prefix: str = ""
    unconditional: str | None = None  # given: score the samples (bot/serving/signals.py)
    pruning: Pruning | None = None
    key: tuple = ()

    def __post_init__(self) -> None:
        s = self.sampling
        self.key = (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens, s.min_new_tokens,
                    self.stop, self.pruning.after if self.pruning else 0)


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

    signals = True  # samples asked with `unconditional` carry the model's signals (bot/serving/signals.py)

    def __init__(self, backend: ModelBackend | Callable[[], ModelBackend], serving: ServingSettings):
        """`backend`, or a function that loads it on the worker thread (see `load`)."""
        self.serving = serving
        self._queue: deque[_Request] = deque()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()  # see `call`
        self._changed = threading.Condition()
        self._closed = False
        self.batches = self.rows = 0
        self._running = 0  # requests in the batch being generated
        self.prefixes = PrefixCache(serving.prefix_cache)  # the KV caches of shared prompt starts
        self._prefix_tokens = functools.lru_cache(maxsize=64)(self._tokenize_prefix)  # one per persona prompt
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
                     adapter: AdapterRef | None, prefix: str = "", unconditional: str | None = None,
                     pruning: Pruning | None = None) -> list[Sample]:
        return await asyncio.wrap_future(self.submit(prompt, n, sampling, stop, adapter, prefix, unconditional,
                                                     pruning))

    def submit(self, prompt: str, n: int, sampling: SamplingSettings, stop: list[str],
               adapter: AdapterRef | None, prefix: str = "", unconditional: str | None = None,
               pruning: Pruning | None = None) -> Future:
        """Queue a request from any thread; the future holds its samples (or the error). `pruning` needs
        `unconditional` (it rates replies by their signals)."""
        request = _Request(prompt, n, sampling, tuple(stop), adapter, Future(), prefix, unconditional,
                           pruning if unconditional is not None else None)
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
            self.prefixes.drop_lineage(lineage)
        await asyncio.wrap_future(self.call(evict))

    def stats(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "adapter_loads": self.cache.loads,
                "evictions": self.cache.evictions, "resident": self.cache.registry.names(),
                "adapter_load_seconds": round(self.cache.load_seconds, 3), "queued": len(self._queue),
                "merged": list(self.cache.merged), "merges": self.cache.merges,
                "merge_seconds": round(self.cache.merge_seconds, 3),
                "prefix_hits": self.prefixes.hits, "prefix_misses": self.prefixes.misses,
                "prefix_adapters": self.prefixes.adapters()}

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
        return len(tokens), self.prefixes.copy_of(request.adapter, request.prefix,
                                                   lambda: self._forward(tokens, 0, None))

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
        scoring = any(r.unconditional is not None for r in requests)
        after = requests[0].pruning.after if requests[0].pruning else 0  # the same in a batch (`_Request.key`)
        first = s if not 0 < after < s.max_new_tokens else s.model_copy(
            update={"max_new_tokens": after, "min_new_tokens": min(s.min_new_tokens, after)})
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        rows = torch.tensor([i for i, r in enumerate(requests) for _ in range(r.n)], device=ids.device)
        request_of = rows.tolist()
        with backend.lock:
            try:
                if backend._generator_seed is not None:
                    torch.manual_seed(backend._generator_seed)
                # The prompt is prefilled once per request, not once per candidate: the cache is then
                # copied to each of the request's rows and generate goes on from the last prompt token.
                cache = None
                if ids.shape[1] > 1:
                    cache = self._prefill(requests, request_slots, ids, mask)
                    cache.batch_select_indices(rows)
                output, cache, recorded = self._decode(ids[rows], mask[rows], cache, first, stop, row_slots, scoring)
                tokens = [row.tolist() for row in output[:, ids.shape[1]:]]
                samples = [backend.decode_sample(torch.tensor(row), stop) for row in tokens]
                if not scoring:
                    return self._per_request(requests, samples)
                samples, openings = self._with_signals(samples, tokens, recorded, stop)
                relevance = [None] * len(samples)
                for i, (request, slot) in enumerate(zip(requests, request_slots)):
                    mine = [row for row, owner in enumerate(request_of) if owner == i]
                    if request.unconditional:
                        values = self._relevance(request, slot, [samples[r] for r in mine], [openings[r] for r in mine])
                        for row, value in zip(mine, values):
                            relevance[row] = value
                samples = [replace(sample, relevance=value) for sample, value in zip(samples, relevance)]
                if first is not s:  # early rejection: only the best unfinished replies go on
                    samples = self._continue_best(requests, request_of, row_slots, samples, tokens, recorded,
                                                  output, mask[rows], cache, s, after, stop)
            finally:
                self.router.clear()
                self.batches += 1
                self.rows += len(row_slots)
        return self._per_request(requests, samples)

    @staticmethod
    def _per_request(requests: list[_Request], samples: list[Sample]) -> list[list[Sample]]:
        results, start = [], 0
        for request in requests:
            results.append(samples[start:start + request.n])
            start += request.n
        return results

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, sampling: SamplingSettings,
                stop: list[str], row_slots: list[int], scoring: bool):
        """One generate call from `cache` (all but the inputs' last token, or None): the output ids, the
        cache it leaves (all but the last sampled token) and, when `scoring`, the recorded signals."""
        backend = self.backend
        recorder = SignalRecorder(backend.model.get_decoder(), self._end_ids()) if scoring else None
        kwargs = generate_kwargs(sampling, backend.tokenizer, stop, recorder=recorder)
        if cache is not None:
            kwargs["cache"] = cache
        self._route(row_slots)
        with recorder.watching() if recorder else contextlib.nullcontext():
            output = backend.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            return_dict_in_generate=True, **kwargs)
        recorded = recorder.finish(output.sequences[:, -1]) if recorder else None
        return output.sequences, output.cache, recorded

    def _continue_best(self, requests, request_of, row_slots, samples, tokens, recorded, output, mask, cache,
                       sampling: SamplingSettings, after: int, stop: list[str]) -> list[Sample]:
        """After `after` tokens: rate each request's unfinished replies (`Pruning.score`), sample the best
        `Pruning.keep` of them to their end (one more generate call on those rows' caches), mark the rest
        pruned. Finished replies stay as they are."""
        tokenizer = self.backend.tokenizer
        end_ids = self._end_ids() | {tokenizer.pad_token_id} - {None}
        unfinished = [row for row, row_tokens in enumerate(tokens) if len(row_tokens) == after
                      and reply_tokens(tokenizer, row_tokens, stop, end_ids) == after]
        going_on = []
        for i, request in enumerate(requests):
            mine = [row for row in unfinished if request_of[row] == i]
            if not request.pruning or len(mine) <= request.pruning.keep:
                going_on += mine
                continue
            scores = request.pruning.score([samples[row] for row in mine])
            ranked = sorted(zip(mine, scores), key=lambda pair: (pair[1] is None, -(pair[1] or 0.0)))
            going_on += [row for row, _ in ranked[:request.pruning.keep]]
        going_on.sort()
        samples = [replace(sample, pruned=row in unfinished and row not in going_on)
                   for row, sample in enumerate(samples)]
        if not going_on:
            return samples
        index = torch.tensor(going_on, device=output.device)
        cache.batch_select_indices(index)
        rest = sampling.model_copy(update={"max_new_tokens": sampling.max_new_tokens - after,
                                           "min_new_tokens": max(sampling.min_new_tokens - after, 0)})
        more_mask = torch.cat([mask[index], torch.ones(len(going_on), after, dtype=mask.dtype, device=mask.device)],
                              dim=1)
        more, _, more_recorded = self._decode(output[index], more_mask, cache, rest, stop,
                                              [row_slots[row] for row in going_on], True)
        logprobs, hidden = recorded
        start = output.shape[1] - after  # where each row's new tokens begin in `output`
        for j, row in enumerate(going_on):
            row_tokens = more[j, start:].tolist()
            combined = (torch.cat([logprobs[row], more_recorded[0][j]]), torch.cat([hidden[row], more_recorded[1][j]]))
            sample = self.backend.decode_sample(torch.tensor(row_tokens), stop)
            [scored], _ = self._with_signals([sample], [row_tokens], ([combined[0]], [combined[1]]), stop)
            samples[row] = replace(scored, relevance=samples[row].relevance)
        return samples

    def _with_signals(self, samples: list[Sample], tokens: list[list[int]], recorded, stop: list[str]
                      ) -> tuple[list[Sample], list[float | None]]:
        """Each sample with the mean log-prob and mean hidden state over its reply's tokens; beside them,
        the mean log-prob of each reply's opening (its first OPENING tokens, for `_relevance`).
        `recorded`: per row, the log-prob of each sampled token and the hidden state that predicted it."""
        logprobs, hidden = recorded
        tokenizer = self.backend.tokenizer
        end_ids = self._end_ids() | {tokenizer.pad_token_id} - {None}
        scored, openings = [], []
        for row, sample in enumerate(samples):
            count = min(reply_tokens(tokenizer, tokens[row], stop, end_ids), len(logprobs[row]))
            if count < 1:
                scored.append(sample)
                openings.append(None)
                continue
            scored.append(replace(sample, logprob=round(float(logprobs[row][:count].mean()), 4),
                                  features=tuple(hidden[row][:count].mean(dim=0).tolist())))
            openings.append(float(logprobs[row][:min(count, OPENING)].mean()))
        return scored, openings

    def _end_ids(self) -> frozenset[int]:
        """The model's end-of-text tokens: its generation config's and the tokenizer's."""
        eos = getattr(self.backend.model.generation_config, "eos_token_id", None)
        ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        return frozenset(ids | {self.backend.tokenizer.eos_token_id} - {None})

    def _relevance(self, request: _Request, slot: int, samples: list[Sample], openings: list[float | None]
                   ) -> list[float | None]:
        """Per sample: the mean log-prob of its opening (`openings`: its first OPENING tokens) given the
        whole prompt minus the same given `request.unconditional` (the persona alone), on the request's
        own adapter. The persona's KV cache comes from the prefix cache, so only the reply label and the
        openings are computed, all samples in one pass."""
        backend, tokenizer = self.backend, self.backend.tokenizer
        split = backend._split_model()
        add_special = not backend.use_chat_template
        base = tokenizer(request.unconditional, add_special_tokens=add_special).input_ids
        rows = []  # (token ids of unconditional prompt + reply, index of the reply's first token)
        for sample in samples:
            ids = tokenizer(request.unconditional + sample.text, add_special_tokens=add_special).input_ids
            start = completion_start(base, ids)
            rows.append((ids[:start + OPENING], start))
        wanted = [i for i, ((ids, start), opening) in enumerate(zip(rows, openings))
                  if start < len(ids) and opening is not None]
        if split is None or not wanted:
            return [None] * len(samples)
        decoder, logits_of = split
        rows = [rows[i] for i in wanted]
        shared, cache = 0, None
        if request.prefix and self.serving.prefix_cache:
            prefix = self._prefix_tokens(request.prefix)
            if all(0 < len(prefix) < start and ids[:len(prefix)] == prefix.tolist() for ids, start in rows):
                shared = len(prefix)
                cache = self.prefixes.copy_of(request.adapter, request.prefix,
                                              lambda: self._forward(prefix.to(backend.model.device), 0, None))
                cache.batch_select_indices(torch.zeros(len(rows), dtype=torch.long, device=backend.model.device))
        width = max(len(ids) for ids, _ in rows) - 1 - shared  # the last token predicts nothing scored
        device = backend.model.device
        inputs = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        for r, (ids, _) in enumerate(rows):  # right-padded: causal attention never looks at the padding
            inputs[r, :len(ids) - 1 - shared] = torch.tensor(ids[shared:-1])
        positions = torch.arange(shared, shared + width)[None].expand(len(rows), -1)
        self._route([slot] * len(rows))
        hidden = decoder(input_ids=inputs.to(device), position_ids=positions.to(device), cache=cache,
                         use_cache=cache is not None).last_hidden_state
        values: list[float | None] = [None] * len(samples)
        for r, (i, (ids, start)) in enumerate(zip(wanted, rows)):
            targets = torch.tensor(ids[start:], device=device)  # the reply's tokens (its text ends before the stop)
            logits = logits_of(hidden[r, start - 1 - shared:len(ids) - 1 - shared]).float()
            unconditional = float((logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)).mean())
            values[i] = round(openings[i] - unconditional, 4)
        return values
