"""Swap time: from promoting a new generation to the first reply made with it.

    python bench/swap.py                 # embedded model, 5 swaps

One user chats on generation N (its adapter resident). The bench promotes generation N+1 (a new
adapter folder) in the database, the way the nightly job does, and times the user's next reply: the
engine reads the pointer, the serving worker loads the new adapter into a free slot beside the old one,
and the reply is sampled on it. The same reply without a promotion is timed alternately, so the
difference is what a swap costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bot.cli import build_engine
from bot.config import load_settings
from bot.engine import UserRef
from bot.model import resolve_model_path
from random_adapters import make_random_adapters  # bench/random_adapters.py


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = load_settings(storage={"data_dir": root / "data"}, sampling={"max_new_tokens": args.tokens,
                                                                                 "min_new_tokens": args.tokens},
                                 chat={"messages_per_minute": 1000})  # one user, faster than a person types
        engine = build_engine(settings)  # wired as the bot wires it: the model on its own thread
        store = engine.store
        paths = make_random_adapters(resolve_model_path(settings.model), root / "adapters", args.swaps + 1,
                                     settings.training)
        user = UserRef("bench", "swap")
        parent = store.add_generation(user.id, 1, str(paths[0]), None, "promoted", {}, 0)
        store.set_serving(user.id, parent)

        async def reply() -> tuple[float, str]:
            await engine.reset(user)  # the same short prompt every time
            started = time.perf_counter()
            offer = await engine.on_message(user, "오늘 어땠어?")
            return time.perf_counter() - started, offer.generation

        await reply()  # generation 1 resident, everything warm
        steady, swapped = [], []
        for number in range(2, args.swaps + 2):
            seconds, _ = await reply()
            steady.append(seconds)
            generation = store.add_generation(user.id, number, str(paths[number - 1]), parent, "promoted", {}, 0)
            store.set_serving(user.id, generation)  # the promotion
            seconds, served = await reply()
            assert served == f"user-bench-swap-gen-{number}", served
            swapped.append(seconds)
            parent = generation
        stats = engine.generator.stats()
        engine.close()
        store.close()
    steady_median, swapped_median = statistics.median(steady), statistics.median(swapped)
    print(f"{args.swaps} promotions, 3 candidates x {args.tokens} tokens, {settings.model.name} ({engine.generator.backend.model.dtype})")
    print(f"  reply on the serving generation      {steady_median:6.2f} s (median)")
    print(f"  first reply after a promotion        {swapped_median:6.2f} s (median)")
    print(f"  swap cost                            {swapped_median - steady_median:+6.2f} s "
          f"(adapter loads {stats['adapter_loads']}, {stats['adapter_load_seconds'] / stats['adapter_loads']:.3f} s each)")


if __name__ == "__main__":
    asyncio.run(main())
