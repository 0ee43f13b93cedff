"""The promotion gate's model work on the embedded model: one item at a time against batched.

    python bench/gate_scoring.py                     # 48 scored pairs, 8 prompts x 6 replies
    python bench/gate_scoring.py --new-tokens 16 --threads 2
    python bench/gate_scoring.py --dtype float32 --prompts 4 --replies 3 --new-tokens 8   # a short run

Scoring: 48 (prompt, completion) pairs (8 chat prompts x 6 replies, like the gate's KL pass), the old
way (one forward per completion, LM head on every position, as `completion_logprobs` did) against
`score_completions` (right-padded batches, LM head only where a completion token is predicted).
Sampling: 6 replies for each of 8 prompts, one `sample` call per prompt against one `sample_many`
call (left-padded rows of all prompts, each prompt prefilled once). Every reply is exactly
`--new-tokens` long so both ways do the same work. Old and new run alternately in one process, so
machine noise hits both; the ratios are the numbers to read.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bot.config import SamplingSettings, load_settings
from bot.model import ModelBackend
from bot.prompt import Turn, build_prompt
from persona import PersonaLibrary

MESSAGES = ["오늘 너무 피곤했어", "저녁 뭐 먹지?", "주말에 뭐 할까", "고양이가 또 토했어", "시험 망쳤어 ㅠㅠ",
            "비 온다", "내일 면접이야", "잠이 안 와"]
REPLIES = ["고생했어~ 푹 쉬어.", "라면 어때? 간단하게 먹자 ㅎㅎ", "음... 나도 잘 모르겠어.",
           "진짜? 무슨 일 있었어? 얘기해 줘.", "괜찮아, 다음엔 더 잘할 거야! 너무 걱정하지 마.", "ㅋㅋㅋ 그럴 수도 있지"]


@torch.inference_mode()
def old_completion_logprobs(backend: ModelBackend, prompt: str, completions: list[str]) -> list[tuple[float, int]]:
    """What `completion_logprobs` did before batching: a full forward (all logits) per completion."""
    add = not backend.use_chat_template
    prompt_ids = backend.tokenizer(prompt, add_special_tokens=add).input_ids
    results = []
    for completion in completions:
        ids = backend.tokenizer(prompt + completion, add_special_tokens=add).input_ids
        start = len(prompt_ids)
        if ids[:start] != prompt_ids:
            start = next(i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b)
        tensor = torch.tensor([ids], device=backend.model.device)
        logits = backend.model(tensor).logits[0, start - 1:-1].float()
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tensor[0, start:, None])
        results.append((logprobs.sum().item(), len(ids) - start))
    return results


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--replies", type=int, default=6, help="completions scored and samples drawn per prompt")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="instead of the configured model.dtype (the gate's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings()
    if args.dtype:
        settings = settings.model_copy(update={"model": settings.model.model_copy(update={"dtype": args.dtype})})
    backend = ModelBackend.load(settings.model)
    card = PersonaLibrary().get(settings.chat.persona)
    prompts = [build_prompt(card, [Turn("char", card.greetings[0]), Turn("user", MESSAGES[i % len(MESSAGES)])],
                            count_tokens=backend.count_tokens, budget=settings.chat.max_context_tokens,
                            chat_template=backend.chat_prompt if backend.use_chat_template else None).text
               for i in range(args.prompts)]
    completions = [f" {REPLIES[j % len(REPLIES)]}\n" for j in range(args.replies)]
    items = [(p, c) for p in prompts for c in completions]
    sampling = SamplingSettings(temperature=settings.sampling.temperature, top_p=settings.sampling.top_p,
                                repetition_penalty=settings.sampling.repetition_penalty,
                                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    runs = {
        "score old": lambda: [s for p in prompts for s in old_completion_logprobs(backend, p, completions)],
        "score new": lambda: backend.score_completions(items),
        "sample old": lambda: [backend.sample(p, args.replies, sampling, []) for p in prompts],
        "sample new": lambda: backend.sample_many(prompts, args.replies, sampling, []),
    }
    # warm-up on a slice of the work
    old_completion_logprobs(backend, prompts[0], completions[:1])
    backend.score_completions(items[:2])
    short = sampling.model_copy(update={"max_new_tokens": 2, "min_new_tokens": 2})
    backend.sample(prompts[0], 2, short, [])
    backend.sample_many(prompts[:2], 2, short, [])

    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            elapsed, results[name] = timed(run)
            times[name].append(elapsed)
    for name, rows in (("sample old", results["sample old"]), ("sample new", results["sample new"])):
        assert all(s.new_tokens == args.new_tokens for row in rows for s in row), name
    old, new = results["score old"], results["score new"]
    assert [n for _, n in old] == [n for _, n in new]
    drift = max(abs(a[0] - b[0]) / max(a[1], 1) for a, b in zip(old, new))

    lengths = [backend.count_tokens(p) for p in prompts]
    print(f"{settings.model.name} ({settings.model.dtype}), {torch.get_num_threads()} threads; prompts "
          f"{min(lengths)}-{max(lengths)} tokens; {len(items)} scored pairs; {args.prompts} prompts x "
          f"{args.replies} samples x {args.new_tokens} new tokens; median of {args.repeats}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for task in ("score", "sample"):
        before, after = medians[f"{task} old"], medians[f"{task} new"]
        print(f"  {task:7} old {before:7.2f} s   new {after:7.2f} s   speed-up {before / after:5.2f}x")
    print(f"  total   old {medians['score old'] + medians['sample old']:7.2f} s   "
          f"new {medians['score new'] + medians['sample new']:7.2f} s")
    print(f"  largest score difference, old vs new: {drift:.2e} nats per token")


if __name__ == "__main__":
    main()
