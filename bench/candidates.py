"""Time "3 candidates x 40 new tokens" on the embedded model: float32 against the configured dtype.

    python bench/candidates.py                 # configured dtype (auto = bfloat16 on CPU) vs float32
    python bench/candidates.py --repeats 5 --threads 2

Both models are loaded side by side and timed alternately in one run, so machine noise hits both;
the ratio is the number to read. Every run generates exactly 40 new tokens per candidate. A third row
runs the configured dtype through the serving worker (bot/serving/local.py), which prefills the prompt once
for all candidates instead of once per candidate; where the LM head is a `FewRowsHead` (float32 on a
CPU), a fourth row runs the same worker with the head as plain `F.linear`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from bot.config import SamplingSettings, ServingSettings, Settings, load_settings
from bot.model import FewRowsHead, ModelBackend, resolve_dtype
from bot.prompt import Turn, build_prompt
from bot.serving import LocalGenerator
from persona import PersonaLibrary

CANDIDATES, NEW_TOKENS = 3, 40


def time_generate(backend: ModelBackend, prompt: str) -> float:
    inputs = backend.tokenizer(prompt, return_tensors="pt")
    started = time.perf_counter()
    with torch.inference_mode():
        out = backend.model.generate(**inputs, do_sample=True, temperature=0.9, top_p=0.95,
                                     num_return_sequences=CANDIDATES, min_new_tokens=NEW_TOKENS,
                                     max_new_tokens=NEW_TOKENS, pad_token_id=backend.tokenizer.pad_token_id)
    elapsed = time.perf_counter() - started
    assert out.shape[1] - inputs["input_ids"].shape[1] == NEW_TOKENS
    return elapsed


def time_serving(generator: LocalGenerator, prompt: str) -> float:
    sampling = SamplingSettings(temperature=0.9, top_p=0.95, repetition_penalty=1.0,
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    started = time.perf_counter()
    samples = asyncio.run(generator.sample(prompt, CANDIDATES, sampling, [], None))
    elapsed = time.perf_counter() - started
    assert all(s.new_tokens == NEW_TOKENS for s in samples), [s.new_tokens for s in samples]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings: Settings = load_settings()
    configured = resolve_dtype(settings.model.dtype)
    generator = LocalGenerator.load(settings.model, ServingSettings(batch_window_ms=0))
    # every model on the serving worker's thread: one OpenMP team, as in the bot (see LocalGenerator)
    backends = {
        "float32": generator.call(lambda: ModelBackend.load(settings.model.model_copy(update={"dtype": "float32"}))),
        str(configured).removeprefix("torch."): generator.call(lambda: ModelBackend.load(settings.model)),
    }
    backends = {name: future.result() for name, future in backends.items()}
    any_backend = next(iter(backends.values()))
    card = PersonaLibrary().get(settings.chat.persona)
    prompt = build_prompt(card, [Turn("char", card.greetings[0]), Turn("user", "오늘 너무 피곤했어. 저녁 뭐 먹지?")],
                          count_tokens=any_backend.count_tokens, budget=settings.chat.max_context_tokens)
    served_name = f"{names_of(backends)[-1]} served"
    runs = {name: (lambda b=backend: generator.call(lambda: time_generate(b, prompt.text)).result())
            for name, backend in backends.items()}
    runs[served_name] = lambda: time_serving(generator, prompt.text)
    head = generator.backend.model.get_output_embeddings()
    if isinstance(head, FewRowsHead):  # the same worker with the head as plain F.linear, for the ratio
        runs[f"{served_name}, F.linear head"] = lambda: with_plain_head(head, lambda: time_serving(generator, prompt.text))
    for run in runs.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run())
    generator.close()
    print(f"{CANDIDATES} candidates x {NEW_TOKENS} new tokens, prompt {prompt.tokens} tokens, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (median)")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:16} {median:6.2f} s   {CANDIDATES * NEW_TOKENS / median:6.1f} tokens/s")
    configured_name = names_of(backends)[-1]
    if configured_name != "float32":
        print(f"  speed-up of {configured_name} over float32: {medians['float32'] / medians[configured_name]:.2f}x")
    print(f"  speed-up of the serving worker over plain generate: "
          f"{medians[configured_name] / medians[served_name]:.2f}x")
    if f"{served_name}, F.linear head" in medians:
        print(f"  speed-up of the few-rows LM head over F.linear: "
              f"{medians[f'{served_name}, F.linear head'] / medians[served_name]:.2f}x")


def with_plain_head(head: FewRowsHead, run):
    head.__class__ = torch.nn.Linear  # between runs the worker is idle, so the switch is safe
    try:
        return run()
    finally:
        head.__class__ = FewRowsHead


def names_of(backends: dict) -> list[str]:
    return list(backends)


if __name__ == "__main__":
    main()
