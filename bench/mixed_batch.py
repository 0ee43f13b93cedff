"""Mixed batch: 8 requests on 8 different adapters against the same 8 requests on the base model.

    python bench/mixed_batch.py                  # embedded model, configured dtype, 3 repeats
    python bench/mixed_batch.py --repeats 5 --rows 8 --tokens 40

Each request asks for one 40-token reply; all 8 are queued together so the serving worker puts them in
one generate call. The same batch runs three ways, alternately in one run: base model only, our
mixed-adapter serving (bot/serving/), and peft's own mixed batches (`adapter_names=`) for reference.
The number to read is throughput relative to the base (target >= 0.85): the median over repeats of
each repeat's ratio to the base batch run just before it. All torch work runs on the
serving worker's thread, the peft reference included (`LocalGenerator.call`), as in the bot.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from random_adapters import make_random_adapters  # bench/random_adapters.py
from bot.config import SamplingSettings, ServingSettings, load_settings
from bot.model import ModelBackend, resolve_model_path
from bot.prompt import Prompt, Turn, build_prompt
from bot.serving import AdapterRef, LocalGenerator
from persona import PersonaLibrary

MESSAGES = ["오늘 너무 피곤했어", "저녁 뭐 먹지?", "주말에 뭐 할까", "고양이가 또 토했어", "시험 망쳤어 ㅠㅠ",
            "비 온다", "운동 가기 싫어", "새 노트북 샀어"]


async def run_ours(generator: LocalGenerator, prompts: list[Prompt], adapters: list[AdapterRef | None],
                   sampling: SamplingSettings) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(generator.sample(p.text, 1, sampling, [], a, p.prefix) for p, a in zip(prompts, adapters)))
    return time.perf_counter() - started


def run_peft(backend: ModelBackend, prompts: list[Prompt], names: list[str], sampling: SamplingSettings) -> float:
    inputs = backend.tokenizer([p.text for p in prompts], return_tensors="pt", padding=True)
    started = time.perf_counter()
    with torch.inference_mode():
        backend.model.generate(**inputs, adapter_names=names, do_sample=True, temperature=sampling.temperature,
                               top_p=sampling.top_p, min_new_tokens=sampling.min_new_tokens,
                               max_new_tokens=sampling.max_new_tokens, pad_token_id=backend.tokenizer.pad_token_id)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    settings = load_settings()
    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = SamplingSettings(max_new_tokens=args.tokens, min_new_tokens=args.tokens, repetition_penalty=1.0)
    card = PersonaLibrary().get("haru")
    generator = LocalGenerator.load(settings.model, ServingSettings(max_adapters=args.rows, batch_window_ms=50,
                                                                    max_batch_rows=args.rows))
    ours = generator.backend
    prompts = [build_prompt(card, [Turn("user", MESSAGES[i % len(MESSAGES)])], count_tokens=ours.count_tokens,
                            budget=1024) for i in range(args.rows)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_random_adapters(resolve_model_path(settings.model), Path(tmp), args.rows, settings.training)
        refs = [AdapterRef(f"user-bench{i}-gen-1", p) for i, p in enumerate(paths)]
        def load_reference() -> ModelBackend:
            backend = ModelBackend.load(settings.model)
            for ref in refs:
                backend.load_adapter(ref.name, ref.path)
            return backend

        reference = await asyncio.wrap_future(generator.call(load_reference))
        runs = {
            "base": lambda: run_ours(generator, prompts, [None] * args.rows, sampling),
            "mixed (ours)": lambda: run_ours(generator, prompts, refs, sampling),
            "mixed (peft)": lambda: asyncio.wrap_future(
                generator.call(lambda: run_peft(reference, prompts, [r.name for r in refs], sampling))),
        }
        for run in runs.values():  # warm-up, and the adapters get loaded
            await run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(await run())
    generator.close()
    print(f"{args.rows} requests x {args.tokens} new tokens, {settings.model.name} ({ours.model.dtype}), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for name, values in times.items():
        # each repeat's ratio is taken against the base batch run just before it, so that a slow
        # stretch of the host weighs on both sides of a ratio; the median and range of those are shown
        ratios = sorted(b / t for b, t in zip(times["base"], values))
        median = statistics.median(values)
        print(f"  {name:13} {median:6.2f} s  {args.rows * args.tokens / median:6.1f} tokens/s  "
              f"throughput vs base {statistics.median(ratios):.2f} (repeats {ratios[0]:.2f}-{ratios[-1]:.2f})")


if __name__ == "__main__":
    asyncio.run(main())
