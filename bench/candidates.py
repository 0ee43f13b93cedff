"""Time "3 candidates x 40 new tokens" on the embedded model: float32 against the configured dtype.

    python bench/candidates.py                 # configured dtype (auto = bfloat16 on CPU) vs float32
    python bench/candidates.py --repeats 5 --threads 2

Both models are loaded side by side and timed alternately in one run, so machine noise hits both;
the ratio is the number to read. Every run generates exactly 40 new tokens per candidate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bot.config import Settings, load_settings
from bot.model import ModelBackend, resolve_dtype
from bot.prompt import Turn, build_prompt
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings: Settings = load_settings()
    configured = resolve_dtype(settings.model.dtype)
    backends = {
        "float32": ModelBackend.load(settings.model.model_copy(update={"dtype": "float32"})),
        str(configured).removeprefix("torch."): ModelBackend.load(settings.model),
    }
    any_backend = next(iter(backends.values()))
    card = PersonaLibrary().get(settings.chat.persona)
    prompt = build_prompt(card, [Turn("char", card.greetings[0]), Turn("user", "오늘 너무 피곤했어. 저녁 뭐 먹지?")],
                          count_tokens=any_backend.count_tokens, budget=settings.chat.max_context_tokens)
    for backend in backends.values():  # warm-up
        time_generate(backend, prompt.text)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.repeats):
        for name, backend in backends.items():
            times[name].append(time_generate(backend, prompt.text))
    print(f"{CANDIDATES} candidates x {NEW_TOKENS} new tokens, prompt {prompt.tokens} tokens, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (median)")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"  {name:9} {median:6.2f} s   {CANDIDATES * NEW_TOKENS / median:6.1f} tokens/s")
    names = list(medians)
    if len(names) == 2 and names[0] != names[1]:
        print(f"  speed-up of {names[1]} over float32: {medians['float32'] / medians[names[1]]:.2f}x")


if __name__ == "__main__":
    main()
