"""Time candidate replies on the embedded model: best-of-N offers against plain ones, and dtypes.

    python bench/candidates.py                 # both parts
    python bench/candidates.py --part offers --repeats 12    # an offer of 3 against the best 3 of 8
    python bench/candidates.py --part dtypes --repeats 5 --threads 2

Everything compared is loaded side by side and timed alternately in one run, so machine noise hits
both; the ratio is the number to read.

offers: what a user waits for, through the serving worker (bot/serving/local.py) with the bot's own
sampling settings: 3 replies sampled as before ranking existed, against `sampling.samples` (8) sampled
with the model's signals (log-probs, hidden states, the relevance pass over the persona alone), the
best `ranking.continue_best` (4) of them sampled on after their opening, and ranked (bot/ranking.py),
as bot/engine.py asks for them. Each repeat uses the next of a few messages, the same one for both; replies
stop where the model ends them (the longest of 8 decides), and a second pair of rows fixes every reply
at 40 new tokens to show the cost per step alone.

dtypes: "3 candidates x 40 new tokens" in float32 against the configured dtype (plain `generate`), then
the configured dtype through the serving worker, which prefills the prompt once for all candidates
instead of once per candidate; where the LM head is a `FewRowsHead` (float32 on a CPU), a fourth row
runs the same worker with the head as plain `F.linear`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from bot import ranking
from bot.config import SamplingSettings, ServingSettings, Settings, load_settings
from bot.model import FewRowsHead, ModelBackend, resolve_dtype
from bot.prompt import Turn, build_prompt
from bot.serving import LocalGenerator, Pruning
from bot.serving.interface import OPENING
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


MESSAGES = ["오늘 너무 피곤했어. 저녁 뭐 먹지?", "주말에 고양이랑 놀았어", "내일 면접이라 떨려",
            "비 오니까 아무것도 하기 싫다", "친구가 생일 선물 줬어!", "요즘 잠이 잘 안 와"]


def time_offer(generator: LocalGenerator, settings: Settings, card, message: str, samples: int, ranked: bool,
               fixed: int = 0) -> float:
    """Seconds until an offer is ready: `samples` replies (with signals and ranking when `ranked`)."""
    prompt = build_prompt(card, [Turn("char", card.greetings[0]), Turn("user", message)],
                          count_tokens=generator.backend.count_tokens, budget=settings.chat.max_context_tokens)
    sampling = settings.sampling
    if fixed:
        sampling = sampling.model_copy(update={"min_new_tokens": fixed, "max_new_tokens": fixed})
    cfg = settings.ranking
    pruning = Pruning(OPENING, max(cfg.continue_best, settings.sampling.candidates),
                      lambda partial: ranking.scores(partial, None, cfg)) if ranked and cfg.continue_best else None
    started = time.perf_counter()
    replies = asyncio.run(generator.sample(prompt.text, samples, sampling, prompt.stop, None, prompt.prefix,
                                           prompt.unconditional if ranked else None, pruning))
    if ranked:
        ranking.score_samples({f"{i}": s for i, s in enumerate(replies)}, None, settings.ranking)
    return time.perf_counter() - started


def compare_offers(settings: Settings, repeats: int) -> None:
    generator = LocalGenerator.load(settings.model, ServingSettings(batch_window_ms=0))
    card = PersonaLibrary().get(settings.chat.persona)
    n, k = settings.sampling.samples, settings.sampling.candidates
    arms = {f"{k} sampled": (k, False, 0), f"best {k} of {n}": (n, True, 0),
            f"{k} x 40 tokens": (k, False, 40), f"best {k} of {n} x 40 tokens": (n, True, 40)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for name, (count, ranked, fixed) in arms.items():  # warm-up
        time_offer(generator, settings, card, MESSAGES[0], count, ranked, fixed)
    for repeat in range(repeats):
        message = MESSAGES[repeat % len(MESSAGES)]
        order = list(arms.items()) if repeat % 2 == 0 else list(reversed(arms.items()))
        for name, (count, ranked, fixed) in order:
            times[name].append(time_offer(generator, settings, card, message, count, ranked, fixed))
    generator.close()
    print(f"offer latency through the serving worker ({settings.model.dtype}, {torch.get_num_threads()} threads, "
          f"{repeats} repeats, median and mean)")
    for name, values in times.items():
        print(f"  {name:26} {statistics.median(values):6.2f} s  {statistics.mean(values):6.2f} s")
    for plain, best in ((f"{k} sampled", f"best {k} of {n}"), (f"{k} x 40 tokens", f"best {k} of {n} x 40 tokens")):
        ratio = statistics.median(times[best]) / statistics.median(times[plain])
        mean_ratio = statistics.mean(times[best]) / statistics.mean(times[plain])
        print(f"  {best} / {plain}: {ratio:.2f}x (median), {mean_ratio:.2f}x (mean)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["offers", "dtypes", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings: Settings = load_settings()
    if args.part in ("offers", "all"):
        compare_offers(settings, max(args.repeats, 6))
    if args.part in ("dtypes", "all"):
        compare_dtypes(settings, args.repeats)


def compare_dtypes(settings: Settings, repeats: int) -> None:
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
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    generator.close()
    print(f"{CANDIDATES} candidates x {NEW_TOKENS} new tokens, prompt {prompt.tokens} tokens, "
          f"{torch.get_num_threads()} threads, {repeats} repeats (median)")
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
