"""Scale-out generation: replies are sampled by a vLLM server, each user's generation as a runtime LoRA.

    key = settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None
    generator = VllmGenerator(settings.serving, settings.model.name, settings.storage.generations_dir, key,
                              add_special_tokens=not backend.use_chat_template)
    samples = await generator.sample(prompt, 3, settings.sampling, ["\\n"], AdapterRef(name, path))
    await generator.aclose()          # or generator.close() from sync code at shutdown

`serving.backend = "vllm"` sends every `sample` to `POST /v1/completions` of vLLM's OpenAI-compatible
server: `model` is the adapter's name (`user-<lineage>-gen-<n>`), or the base model's name for users
without a generation. Before the first request that names an adapter, this client registers it with
`POST /v1/load_lora_adapter`; concurrent first requests share that one load. A 400 "has already been
loaded" counts as loaded (another bot on the same server got there first). A 404 on a completion means
the server lost the adapter (it restarted): the adapter is loaded again and the request retried once.
The server tokenizes the prompt itself; a prompt rendered with a chat template already holds BOS, so
`add_special_tokens=False` keeps the server from adding a second one (the local backend does the same).

At most `serving.max_adapters` adapters stay registered by this client; loading one more unloads the
least recently used one that no request is using. When a newer generation of a lineage is loaded, the
older ones are unloaded as soon as their last in-flight reply finishes, so a promotion never cuts a reply
short (the bookkeeping is bot/serving/registry.py's, shared with the local worker). Unload failures are
only logged.

The server (any number of bots can share one): `banryeo vllm serve` starts one for the configured
model with the flags below (bot/vllm_server.py), or by hand:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model <base> \
        --enable-lora --max-loras 8 --max-lora-rank 16 --max-cpu-loras 32

The base model must be the one the generations were trained on (for the embedded model, the converted
folder in `model.cache_dir`); set `serving.vllm_model` to its name as `GET /v1/models` lists it, and
VLLM_API_KEY when the server wants a key. `--max-loras` is how many different adapters one
batch may mix (the default, 1, serialises users); `--max-lora-rank` must cover `training.lora_r`;
`--max-cpu-loras` is the server's own adapter cache and should exceed `max_adapters` times the number
of bots.

Deployment: one vLLM server and one bot, or N bots sharing the SQLite file and the generations folder.
The server reads adapter folders itself; when it mounts the generations folder at another path, set
`serving.vllm_adapter_dir` to that path (an adapter's path below `storage.generations_dir` is sent as the
same relative path below it).

Sharp edges:
- Names are never reused for different weights: vLLM's prefix cache keys on the adapter name, so new
  weights under an old name could be served from stale cache blocks. That is also why `load_inplace`
  is never used.
- Unloading only removes the name from the server's registry; the engine keeps the weights cached until
  its own LRU evicts them and may read the folder again. Keep generation folders for a while after they
  stop being served (`training.keep_generations`).
- Replicas do not share the runtime registry. Point each bot at one server; with several servers behind
  one URL, an adapter loaded on one is unknown to the others.
- Bots sharing a server do not see each other's requests: one may unload an adapter another still uses.
  The other's next request gets a 404 and recovers by reloading (one extra round trip).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from pathlib import Path, PurePosixPath

import aiohttp

from bot.config import SamplingSettings, ServingSettings
from bot.serving.interface import AdapterError, AdapterRef, Pruning, Sample
from bot.serving.registry import AdapterRegistry

logger = logging.getLogger(__name__)

SERVER_FLAGS = ("start the server with `banryeo vllm serve`, or with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
                "--enable-lora --max-lora-rank <at least training.lora_r>")


class VllmError(Exception):
    """The vLLM server could not be reached or failed; the message says what to check."""


class VllmGenerator:
    """The `bot.serving.Generator` that samples on a vLLM server; one per process, used from one event loop."""

    def __init__(self, serving: ServingSettings, base_model: str, generations_dir: Path,
                 api_key: str | None = None, *, add_special_tokens: bool | None = None):
        if not serving.vllm_url:
            raise VllmError("serving.backend is 'vllm' but serving.vllm_url is not set (e.g. http://gpu:8000)")
        url = serving.vllm_url.rstrip("/")
        self.url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.base_model = serving.vllm_model or base_model
        self.generations_dir = Path(generations_dir).expanduser()
        self.adapter_dir = serving.vllm_adapter_dir
        self.timeout = serving.vllm_timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.add_special_tokens = add_special_tokens  # None: the server's default (True: it adds BOS)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._adapters = AdapterRegistry(serving.max_adapters)  # loaded on the server; requests in flight on each
        self._loading: dict[str, asyncio.Task] = {}             # name -> the one load in progress
        self._unloading: dict[str, asyncio.Task] = {}
        self._base_in_flight = 0
        self._closing: set[asyncio.Task] = set()
        self._counts: Counter[str] = Counter()

    # -- Generator --------------------------------------------------------------------------------

    signals = False  # samples carry no log-probs or states: offers are not ranked (bot/ranking.py)

    async def sample(self, prompt: str, n: int, sampling: SamplingSettings, stop: list[str],
                     adapter: AdapterRef | None, prefix: str = "", unconditional: str | None = None,
                     pruning: Pruning | None = None) -> list[Sample]:
        """`n` continuations of `prompt` from `adapter` (None: the base model), each cut at the first stop.

        `prefix` needs nothing here: vLLM's automatic prefix caching reuses shared prompt starts itself.
        `unconditional` and `pruning` are accepted and not used: these samples carry no signals (`signals`).

        Raises AdapterError when the server refuses to load the adapter (the caller can fall back to
        the base model) and VllmError when the server cannot be reached or fails.
        """
        if n < 1:
            return []
        self._counts["requests"] += 1
        model = adapter.name if adapter is not None else self.base_model
        payload = {
            "model": model, "prompt": prompt, "n": n, "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,  # -1: off (also when the model's generation config sets one)
            "repetition_penalty": sampling.repetition_penalty, "stop": list(stop),
            "return_token_ids": True,       # per-choice token counts; older servers ignore it
        }
        if self.add_special_tokens is not None:
            payload["add_special_tokens"] = self.add_special_tokens
        if sampling.min_new_tokens:
            payload["min_tokens"] = sampling.min_new_tokens
        if adapter is None:
            self._base_in_flight += 1
            try:
                status, body = await self._post("/v1/completions", payload)
            finally:
                self._base_in_flight -= 1
            return self._samples(status, body, model, stop)
        self._adapters.hold(model)
        self._adapters.touch(model)
        try:
            await self._ensure_loaded(adapter)
            status, body = await self._post("/v1/completions", payload)
            if status == 404:  # the server forgot it (restart, or another bot unloaded it)
                await self._ensure_loaded(adapter, reload=True)
                status, body = await self._post("/v1/completions", payload)
                if status == 404:
                    raise VllmError(
                        f"vLLM at {self.url} still does not know adapter {model} right after loading it: "
                        "replicas behind one URL do not share runtime-loaded adapters; point serving.vllm_url "
                        "at a single server")
            return self._samples(status, body, model, stop)
        finally:
            self._release(model)

    def pending(self) -> int:
        """Requests sent to the server and not yet answered."""
        return sum(self._adapters.holds().values()) + self._base_in_flight

    def stats(self) -> dict:
        return {
            "backend": "vllm", "url": self.url, "base_model": self.base_model,
            "loads": self._counts["loads"], "unloads": self._counts["unloads"],
            "loaded": self._adapters.names(), "requests": self._counts["requests"],
            "reloads_after_404": self._counts["reloads_after_404"],
            "in_flight": self._adapters.holds(),
        }

    async def aclose(self) -> None:
        """Wait briefly for pending unloads, then close the HTTP session (loaded adapters stay on the server)."""
        pending = [task for task in self._unloading.values() if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=min(self.timeout, 5))
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def close(self) -> None:
        """Close the HTTP session from sync code: before, during or after the event loop has run."""
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is loop:  # sync code inside the loop: close soon after
            task = loop.create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif loop is not None and loop.is_running():  # the loop runs in another thread
            try:
                asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - shutting down; nothing left to do about it
                logger.debug("closing the vLLM session failed", exc_info=True)
        elif loop is not None and not loop.is_closed() and running is None:
            loop.run_until_complete(session.close())
        else:  # the loop is gone (asyncio.run has returned): nothing can be awaited; close what is left now
            connector = session.connector
            session.detach()
            close_now = getattr(connector, "_close", None)  # aiohttp's synchronous part of connector.close()
            if close_now is not None:
                close_now()

    # -- other public helpers ---------------------------------------------------------------------

    async def check(self) -> list[str]:
        """The model names the server lists; raises VllmError when it is unreachable or lacks the base model."""
        status, body = await self._request("GET", "/v1/models", None)
        if status != 200:
            raise VllmError(self._describe(status, "/v1/models", body))
        try:
            names = [card["id"] for card in json.loads(body)["data"]]
        except (ValueError, KeyError, TypeError):
            raise VllmError(f"vLLM at {self.url} answered /v1/models with something else: {body[:200]!r}") from None
        if self.base_model not in names:
            raise VllmError(f"vLLM at {self.url} does not serve {self.base_model!r} (it serves {names}); "
                            "set serving.vllm_model to the base model's name there")
        return names

    def server_path(self, path: Path) -> str:
        """The adapter folder as the server sees it (mapped into serving.vllm_adapter_dir when set)."""
        path = Path(path).expanduser()
        if self.adapter_dir is None:
            return str(path)
        for base, inside in ((self.generations_dir, path), (self.generations_dir.resolve(), path.resolve())):
            try:
                relative = inside.relative_to(base)
            except ValueError:
                continue
            return str(PurePosixPath(str(self.adapter_dir)) / relative.as_posix())
        logger.warning("adapter folder %s is not under %s; sending it to vLLM unmapped", path, self.generations_dir)
        return str(path)

    # -- adapter lifecycle ------------------------------------------------------------------------

    async def _ensure_loaded(self, adapter: AdapterRef, reload: bool = False) -> None:
        name = adapter.name
        while True:
            if (unloading := self._unloading.get(name)) is not None and not unloading.done():
                await asyncio.shield(unloading)  # never raises; then load it afresh
                continue
            if (loading := self._loading.get(name)) is not None:
                await asyncio.shield(loading)  # one load per name; its error reaches every waiter
                return
            if name in self._adapters and not reload:
                return
            if reload:  # one reload serves every request that got the 404 meanwhile
                self._counts["reloads_after_404"] += 1
                logger.warning("vLLM at %s no longer knows adapter %s; loading it again", self.url, name)
            self._adapters.discard(name)
            task = asyncio.ensure_future(self._load(adapter))
            self._loading[name] = task
            task.add_done_callback(lambda done: self._load_done(name, done))
            await asyncio.shield(task)
            return

    def _load_done(self, name: str, task: asyncio.Task) -> None:
        if self._loading.get(name) is task:
            del self._loading[name]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter was cancelled

    async def _load(self, adapter: AdapterRef) -> None:
        name = adapter.name
        self._trim(reserve=len(self._loading))
        path = self.server_path(adapter.path)
        payload = {"lora_name": name, "lora_path": path}
        status, body = await self._post("/v1/load_lora_adapter", payload)
        message = _error_message(body)
        if status == 200:
            self._counts["loads"] += 1
            logger.info("vLLM loaded adapter %s from %s", name, path)
        elif status == 400 and "has already been loaded" in message:
            logger.debug("adapter %s was already loaded on the vLLM server", name)
        elif status == 404 and _is_missing_route(body):
            raise VllmError(f"vLLM at {self.url} has no /v1/load_lora_adapter: {SERVER_FLAGS}")
        elif status in (400, 404) and re.search(r"enable.?lora|lora is not enabled", message, re.I):
            raise VllmError(f"vLLM at {self.url} cannot load LoRA adapters ({message}): {SERVER_FLAGS}")
        elif status in (400, 404) or (status >= 500 and "add_lora" in message):
            # 404: no folder there; 500 "Call to add_lora method failed": the worker could not read it
            # (cut-short or corrupt weights, a rank above --max-lora-rank). The server itself is fine.
            raise AdapterError(
                f"vLLM could not load adapter {name} from {path}: {message} (the folder must exist where the "
                "server runs, set serving.vllm_adapter_dir when it mounts the generations folder elsewhere; "
                "a rank above the server's --max-lora-rank is refused)")
        else:
            raise VllmError(self._describe(status, "/v1/load_lora_adapter", body))
        for retired in self._adapters.add(adapter):  # the lineage's older generations, once their replies are done
            self._unload_soon(retired)

    async def evict_lineage(self, lineage: str) -> None:
        """Unload the lineage's adapters from the server (each as soon as its replies in flight are done)."""
        for name in self._adapters.retire_lineage(lineage):
            self._unload_soon(name)

    def _release(self, name: str) -> None:
        for retired in self._adapters.release(name):
            self._unload_soon(retired)
        if not self._adapters.is_held(name):  # its last reply is done: it counts as used just now
            self._adapters.touch(name)
            self._trim()

    def _trim(self, reserve: int = 0) -> None:
        """Unload least recently used idle adapters until at most max_adapters (plus `reserve` loads) remain.

        Adapters with replies in flight are never chosen, so the bound can be passed for a while.
        """
        for name in self._adapters.make_room(reserve):
            self._unload_soon(name)
        if len(self._adapters) + reserve > self._adapters.capacity:
            logger.debug("%d adapters in use on vLLM, above max_adapters=%d", len(self._adapters),
                         self._adapters.capacity)

    def _unload_soon(self, name: str) -> None:
        """Unload an adapter the registry let go, in the background (a later load of it waits for this)."""
        task = asyncio.ensure_future(self._unload(name))
        self._unloading[name] = task
        task.add_done_callback(lambda done: self._unloading.pop(name, None) if self._unloading.get(name) is done
                               else None)

    async def _unload(self, name: str) -> None:
        try:
            status, body = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except VllmError as exc:
            logger.warning("could not unload adapter %s: %s", name, exc)
            return
        if status == 200:
            self._counts["unloads"] += 1
            logger.info("vLLM unloaded adapter %s", name)
        elif status == 404 and not _is_missing_route(body):
            logger.debug("adapter %s was already gone from the vLLM server", name)
        else:
            logger.warning("could not unload adapter %s: %s", name,
                           self._describe(status, "/v1/unload_lora_adapter", body))

    # -- HTTP -------------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._loop = asyncio.get_running_loop()
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
                # no queueing here (the server schedules); idle connections are dropped before vLLM's
                # own 5 s keep-alive closes them, so a request never goes out on a closing connection
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
            )
        return self._session

    async def _post(self, route: str, payload: dict) -> tuple[int, str]:
        return await self._request("POST", route, payload)

    async def _request(self, method: str, route: str, payload: dict | None) -> tuple[int, str]:
        try:
            async with self._client().request(method, self.url + route, json=payload) as response:
                return response.status, await response.text()
        except TimeoutError:
            raise VllmError(f"vLLM at {self.url} did not answer {route} within {self.timeout:g} s "
                            "(serving.vllm_timeout); is the server overloaded or still starting?") from None
        except aiohttp.ClientError as exc:
            raise VllmError(f"cannot reach vLLM at {self.url} ({exc}); check serving.vllm_url and that "
                            "`vllm serve` is running") from None

    def _samples(self, status: int, body: str, model: str, stop: list[str]) -> list[Sample]:
        if status != 200:
            raise VllmError(self._describe(status, "/v1/completions", body, model))
        try:
            data = json.loads(body)
            choices = sorted(data["choices"], key=lambda choice: choice.get("index", 0))
            texts = [choice["text"] or "" for choice in choices]
        except (ValueError, KeyError, TypeError):
            raise VllmError(f"vLLM at {self.url} answered /v1/completions with something else: "
                            f"{body[:200]!r}") from None
        counts = _token_counts(choices, texts, (data.get("usage") or {}).get("completion_tokens"))
        samples = []
        for choice, text, tokens in zip(choices, texts, counts):
            positions = [text.find(s) for s in stop if s and s in text]  # vLLM already excludes stop strings
            cut = text[: min(positions)] if positions else text
            samples.append(Sample(cut, tokens, choice.get("finish_reason") == "stop" or bool(positions)))
        return samples

    def _describe(self, status: int, route: str, body: str, model: str | None = None) -> str:
        message = _error_message(body)
        if status in (401, 403):
            return (f"vLLM at {self.url} refused the request ({status}): set VLLM_API_KEY to the key the server "
                    "was started with (--api-key)")
        if status == 404 and route == "/v1/completions" and model == self.base_model:
            return (f"vLLM at {self.url} does not serve {model!r}: set serving.vllm_model to the base model's "
                    "name as GET /v1/models lists it")
        if status >= 500:
            return f"vLLM at {self.url} failed on {route} ({status}): {message}; see the server's log"
        return f"vLLM at {self.url} refused {route} ({status}): {message}"


def _token_counts(choices: list[dict], texts: list[str], completion_tokens: int | None) -> list[int]:
    """Generated tokens per choice: exact from `token_ids` (vLLM with return_token_ids), else the
    response's total `usage.completion_tokens` shared out in proportion to each text's length."""
    if all(isinstance(choice.get("token_ids"), list) for choice in choices):
        return [len(choice["token_ids"]) for choice in choices]
    if not isinstance(completion_tokens, int) or not choices:
        return [0] * len(choices)
    weights = [len(text) + 1 for text in texts]
    counts = [completion_tokens * weight // sum(weights) for weight in weights]
    counts[weights.index(max(weights))] += completion_tokens - sum(counts)
    return counts


def _error_message(body: str) -> str:
    """The message of a vLLM error body: {"error": {...}} (current), {"message": ...} (older) or text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if isinstance(data.get(key), str):
                return data[key]
    return body.strip()[:300]


def _is_missing_route(body: str) -> bool:
    """FastAPI's own 404 (a route the server does not have), not vLLM's NotFoundError."""
    try:
        return json.loads(body) == {"detail": "Not Found"}
    except ValueError:
        return False
