"""The local serving worker against a real vLLM (CPU build) on this machine: same model, prompts, sampling.

    banryeo vllm install                       # once: vLLM in its own virtualenv (serving.vllm_venv)
    python bench/vllm_peer.py                  # the configured dtype, 3 repeats
    python bench/vllm_peer.py --dtype bfloat16 --repeats 5

Both backends serve the embedded model (the local worker in this process, vLLM as a server started here
with `banryeo vllm serve`'s command) with the same 8 LoRA adapters (random, the shape of a nightly
generation) and are driven through the bot's own clients (`LocalGenerator`, `VllmGenerator`), so vLLM's
numbers include the HTTP round trip the bot pays. Every reply is exactly 40 new tokens (min = max,
no stop string), temperature 0.9, top-p 0.95, the 하루 persona prompt. Three workloads, each timed
local / vLLM alternately after a warm-up (which also loads every adapter on both sides):

- latency, base model: one user's message, 3 candidates x 40 tokens;
- latency, with an adapter: the same on one user's generation;
- throughput: 8 users at once, each on their own adapter, 3 candidates x 40 tokens each.

The number to read is the ratio local / vLLM of the median times (above 1: vLLM is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from random_adapters import make_random_adapters  # bench/random_adapters.py
from bot.config import SamplingSettings, load_settings
from bot.model import resolve_model_path
from bot.prompt import Turn, build_prompt
from bot.serving import AdapterRef, LocalGenerator
from bot.serving.vllm import VllmGenerator
from bot.vllm_server import VllmServer, free_port, server_dtype
from persona import PersonaLibrary

CANDIDATES, NEW_TOKENS, USERS = 3, 40, 8
MESSAGES = ["오늘 너무 피곤했어", "저녁 뭐 먹지?", "주말에 뭐 할까", "고양이가 또 토했어", "시험 망쳤어 ㅠㅠ",
            "비 온다", "운동 가기 싫어", "새 노트북 샀어"]


async def timed(generator, requests: list[tuple[str, str, AdapterRef | None]], sampling: SamplingSettings) -> float:
    started = time.perf_counter()
    results = await asyncio.gather(*(generator.sample(text, CANDIDATES, sampling, [], adapter, prefix)
                                     for text, prefix, adapter in requests))
    elapsed = time.perf_counter() - started
    counts = [s.new_tokens for samples in results for s in samples]
    assert counts == [NEW_TOKENS] * CANDIDATES * len(requests), counts
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default=None,
                        help="both backends (default: model.dtype, auto: what the local backend picks here)")
    args = parser.parse_args()
    settings = load_settings()
    if args.dtype:
        settings.model.dtype = args.dtype
    settings.model.dtype = server_dtype(settings, gpu=False)  # one explicit dtype for both sides
    settings.serving.max_adapters = USERS
    settings.serving.vllm_timeout = 900  # vLLM CPU without AVX-512 takes minutes for the 8-user batch
    sampling = SamplingSettings(temperature=0.9, top_p=0.95, top_k=0, repetition_penalty=1.0,
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    local = LocalGenerator.load(settings.model, settings.serving)
    card = PersonaLibrary().get("haru")
    prompts = [build_prompt(card, [Turn("char", card.greetings[0]), Turn("user", message)],
                            count_tokens=local.backend.count_tokens, budget=settings.chat.max_context_tokens)
               for message in MESSAGES[:USERS]]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_random_adapters(resolve_model_path(settings.model), Path(tmp), USERS, settings.training)
        adapters = [AdapterRef(f"user-bench{i}-gen-1", folder) for i, folder in enumerate(folders)]
        port = free_port()
        settings.serving.vllm_url = f"http://127.0.0.1:{port}"
        server = VllmServer.for_settings(settings, port, Path(tmp) / "vllm.log", gpu=False, max_loras=USERS)
        print(f"starting vLLM ({settings.model.dtype}; log {server.log_path}) ...", flush=True)
        started = time.perf_counter()
        with server:
            print(f"  ready in {time.perf_counter() - started:.0f} s", flush=True)
            remote = VllmGenerator(settings.serving, settings.model.name, settings.storage.generations_dir,
                                   add_special_tokens=not local.backend.use_chat_template)
            one = prompts[0]
            workloads = {
                "latency, base": [(one.text, one.prefix, None)],
                "latency, adapter": [(one.text, one.prefix, adapters[0])],
                f"throughput, {USERS} users on {USERS} adapters": [
                    (p.text, p.prefix, a) for p, a in zip(prompts, adapters)],
            }
            backends = {"local": local, "vLLM": remote}
            first_adapter = {}
            for name, backend in backends.items():  # warm-up; the first request on a new adapter loads it
                first_adapter[name] = await timed(backend, workloads["latency, adapter"], sampling)
                for requests in workloads.values():
                    await timed(backend, requests, sampling)
            times = {(w, b): [] for w in workloads for b in backends}
            for _ in range(args.repeats):
                for workload, requests in workloads.items():
                    for name, backend in backends.items():
                        times[workload, name].append(await timed(backend, requests, sampling))
            await remote.aclose()
    local.close()
    print(f"{settings.model.name} ({settings.model.dtype}), prompt {one.tokens} tokens, {CANDIDATES} candidates x "
          f"{NEW_TOKENS} new tokens per user, median of {args.repeats}")
    print(f"  first request on a new adapter: local {first_adapter['local']:.2f} s, vLLM {first_adapter['vLLM']:.2f} s")
    for workload, requests in workloads.items():
        tokens = CANDIDATES * NEW_TOKENS * len(requests)
        medians = {name: statistics.median(times[workload, name]) for name in backends}
        row = "  ".join(f"{name} {median:6.2f} s ({tokens / median:5.1f} tok/s)" for name, median in medians.items())
        print(f"  {workload:34} {row}   local/vLLM time {medians['local'] / medians['vLLM']:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
