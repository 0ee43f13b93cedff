"""Load: simulated users chatting at once, each on their own adapter, with a promotion in the middle.

    python bench/load.py                         # 32 users, 180 s, embedded model
    python bench/load.py --users 32 --seconds 300 --max-adapters 16

Every user has their own generation (a random LoRA adapter, r16 on every linear layer) and loops:
send a message through the real DialogueEngine (SQLite store, local serving), pick a candidate, repeat.
Halfway through, half of the users get a new generation promoted; the run reports how long until each
of them is first answered on it (swap time), and checks that no message went unanswered and no reply
was produced with anyone else's adapter (every offer names the user's own generation).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bot.cli import build_engine
from bot.config import load_settings
from bot.engine import EngineError, UserRef
from bot.generations import adapter_name
from bot.model import resolve_model_path
from random_adapters import make_random_adapters  # bench/random_adapters.py

MESSAGES = ["오늘 너무 피곤했어", "저녁 뭐 먹지?", "주말에 뭐 할까", "고양이가 또 토했어", "시험 망쳤어 ㅠㅠ",
            "비 온다", "운동 가기 싫어", "새 노트북 샀어", "내일 면접이야", "잠이 안 와"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--max-adapters", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = load_settings(storage={"data_dir": root / "data"}, schedule={"enabled": False},
                                 sampling={"max_new_tokens": args.tokens},
                                 serving={"max_adapters": args.max_adapters, "batch_window_ms": 20})
        engine = build_engine(settings)  # wired as the bot wires it: the model on its own thread
        store = engine.store
        paths = make_random_adapters(resolve_model_path(settings.model), root / "adapters", args.users * 3 // 2,
                                     settings.training)
        users = [UserRef("bench", str(i)) for i in range(args.users)]
        for user, path in zip(users, paths):
            store.set_serving(user.id, store.add_generation(user.id, 1, str(path), None, "promoted", {}, 0))

        latencies: list[float] = []
        sent = answered = refused = mixed = 0
        promoted_at: dict[str, float] = {}
        swap_seconds: dict[str, float] = {}
        stop_at = time.monotonic() + args.seconds

        async def chat(user: UserRef) -> None:
            nonlocal sent, answered, refused, mixed
            rng = random.Random(user.id)
            while time.monotonic() < stop_at:
                sent += 1
                started = time.monotonic()
                try:
                    offer = await engine.on_message(user, rng.choice(MESSAGES))
                except EngineError:
                    refused += 1
                    continue
                answered += 1
                latencies.append(time.monotonic() - started)
                lineage_names = {adapter_name({"lineage": user.id, "number": n}) for n in (1, 2)}
                if offer.generation not in lineage_names:
                    mixed += 1
                if offer.generation.endswith("-gen-2") and user.id not in swap_seconds:
                    swap_seconds[user.id] = time.monotonic() - promoted_at[user.id]
                if not offer.auto_picked:
                    await engine.on_pick(user, offer.id, rng.randrange(len(offer.texts)))

        async def promote_halfway() -> None:
            await asyncio.sleep(args.seconds / 2)
            for user, path in zip(users[: len(users) // 2], paths[len(users):]):
                parent = store.serving(user.id)
                store.set_serving(user.id, store.add_generation(user.id, 2, str(path), parent["id"], "promoted", {}, 0))
                promoted_at[user.id] = time.monotonic()

        began = time.monotonic()
        await asyncio.gather(promote_halfway(), *(chat(u) for u in users))
        elapsed = time.monotonic() - began
        stats = engine.generator.stats()
        engine.close()
        store.close()

    print(f"{args.users} users for {elapsed:.0f} s on {settings.model.name} ({engine.generator.backend.model.dtype}, "
          f"{torch.get_num_threads()} threads), {settings.sampling.candidates} candidates x {args.tokens} tokens, "
          f"{args.max_adapters} resident adapters at most")
    print(f"  messages sent {sent}, answered {answered}, refused {refused}, unanswered {sent - answered - refused}")
    print(f"  replies on someone else's adapter: {mixed}")
    print(f"  throughput {answered / elapsed * 60:.1f} replies/min; latency p50 {percentile(latencies, 0.5):.1f} s, "
          f"p95 {percentile(latencies, 0.95):.1f} s")
    print(f"  batches {stats['batches']} (mean {stats['rows'] / max(stats['batches'], 1):.1f} sequences), "
          f"adapter loads {stats['adapter_loads']} ({stats['adapter_load_seconds']:.1f} s), "
          f"evictions {stats['evictions']}, persona-prefix cache hits {stats['prefix_hits']} / misses "
          f"{stats['prefix_misses']}")
    if swap_seconds:
        waits = list(swap_seconds.values())
        print(f"  swap: {len(waits)}/{len(promoted_at)} promoted users answered on the new generation; "
              f"promotion to first new reply p50 {statistics.median(waits):.1f} s, max {max(waits):.1f} s")


if __name__ == "__main__":
    asyncio.run(main())
