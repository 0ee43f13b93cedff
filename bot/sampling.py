"""Top-p sampling that never sorts the whole vocabulary.

    output = model.generate(**inputs, **generate_kwargs(settings.sampling, tokenizer, stop=["\\n"]))

transformers' top-p warper sorts every logit at every step, and its multinomial draw then scans the
whole vocabulary again: with Gemma 3's 262k tokens that was about 40% of a reply's time on the CPU.
The nucleus (the fewest most probable tokens that hold `top_p` of the probability) nearly always lies
within the top few hundred, so `NucleusSampler` takes the top `POOL` tokens with `torch.topk`, checks
that they hold at least `top_p` of the probability (rows where they do not look at 16 times as many,
then are sorted in full, so the result is exactly top-p, never an approximation; a flat distribution
of a base model, more common the more replies are sampled, seldom needs the full sort) and draws
among them. It runs as the last logits processor of a greedy `generate`: it returns scores in which only the drawn token is finite, so greedy
decoding emits it, while transformers' repetition penalty, minimum length and stop criteria still apply.
"""

from __future__ import annotations

import functools

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteriaList,
                          StopStringCriteria)

from bot.config import SamplingSettings

POOL = 1024  # tokens looked at first
WIDE = 16    # rows whose nucleus is not within the pool look at POOL * WIDE, then sort in full


class NucleusSampler(LogitsProcessor):
    """Temperature, then top-k (0: off), then top-p, then one draw per row; same semantics as
    transformers' TemperatureLogitsWarper + TopKLogitsWarper + TopPLogitsWarper + multinomial."""

    def __init__(self, temperature: float, top_p: float, top_k: int = 0, pool: int = POOL):
        self.temperature, self.top_p, self.top_k, self.pool = temperature, top_p, top_k, pool

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs, tokens = self.distribution(scores)
        drawn = tokens.gather(-1, torch.multinomial(probs, 1))
        out = torch.full_like(scores, float("-inf"), dtype=torch.float32)
        return out.scatter_(-1, drawn, 0.0)

    def distribution(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the tokens that may be drawn and their (unnormalised) probabilities; zero elsewhere."""
        scores = scores.float() / self.temperature
        vocab = scores.shape[-1]
        if self.top_p >= 1 and not self.top_k:  # no cut at all: every token, as transformers does
            return scores.softmax(dim=-1), torch.arange(vocab, device=scores.device).expand_as(scores)
        if self.top_k and self.top_k <= self.pool:  # the top k are the whole candidate set: always exact
            values, tokens = scores.topk(min(self.top_k, vocab), dim=-1)
            probs = values.softmax(dim=-1)
        else:
            probs_all = scores.softmax(dim=-1)
            probs, tokens = probs_all.topk(min(self.pool, vocab), dim=-1)
            short = probs.sum(dim=-1) < self.top_p  # the nucleus reaches past the pool
            if self.top_k:
                probs, tokens = self._full(scores, probs, tokens, torch.arange(len(scores)))
            elif short.any():  # those rows: a pool WIDE times larger (a flat distribution), else a full sort
                rows = short.nonzero().flatten()
                wide, wide_tokens = probs_all[rows].topk(min(self.pool * WIDE, vocab), dim=-1)
                probs, tokens = _put_rows(probs, tokens, rows, wide, wide_tokens)
                still = rows[wide.sum(dim=-1) < self.top_p]
                if len(still):
                    probs, tokens = self._full(scores[still], probs, tokens, still)
        if self.top_p >= 1:
            return probs, tokens
        kept = probs.cumsum(dim=-1) - probs < self.top_p  # keep while the mass before a token is short of top_p
        kept[:, 0] = True
        return torch.where(kept, probs, torch.zeros_like(probs)), tokens

    def _full(self, scores: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor):
        """Rows `rows` (their `scores`) redone with a full sort (and top-k when set above the pool)."""
        values, order = scores.sort(dim=-1, descending=True)
        if self.top_k:
            values, order = values[:, :self.top_k], order[:, :self.top_k]
        return _put_rows(probs, tokens, rows, values.softmax(dim=-1), order)


def _put_rows(probs: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, new_probs: torch.Tensor,
              new_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`probs` and `tokens` with rows `rows` replaced by wider ones; every row zero-padded to the widest."""
    width = max(new_probs.shape[-1], probs.shape[-1])
    padded_probs = torch.nn.functional.pad(probs, (0, width - probs.shape[-1]))
    padded_tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[-1]))
    padded_probs[rows] = torch.nn.functional.pad(new_probs, (0, width - new_probs.shape[-1]))
    padded_tokens[rows] = torch.nn.functional.pad(new_tokens, (0, width - new_tokens.shape[-1]))
    return padded_probs, padded_tokens


def generate_kwargs(sampling: SamplingSettings, tokenizer, stop: list[str] | tuple[str, ...] = (),
                    recorder: LogitsProcessor | None = None) -> dict:
    """The `generate` arguments for sampling with these settings through `NucleusSampler`, padding with
    `tokenizer`'s pad token and stopping at any of `stop`.

    A `recorder` (bot/serving/signals.py) sees the model's raw scores: the minimum length and the
    repetition penalty then run as our own processors after it, instead of as generate's own (those run
    before ours)."""
    sampler = NucleusSampler(sampling.temperature, sampling.top_p, sampling.top_k)
    penalty = sampling.repetition_penalty
    minimum = sampling.min_new_tokens
    if recorder is None:
        processors = [sampler]
    else:
        from bot.serving.signals import EndNotBefore

        ends = recorder.end_ids or frozenset({tokenizer.eos_token_id} - {None})
        processors = [recorder, *([EndNotBefore(minimum, ends)] if minimum else []),
                      *([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1 else []), sampler]
        penalty, minimum = 1.0, 0
    kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                  logits_processor=LogitsProcessorList(processors),
                  repetition_penalty=penalty, max_new_tokens=sampling.max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id)
    if minimum:
        kwargs["min_new_tokens"] = minimum
    if stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([stop_criteria(tokenizer, tuple(stop))])
    return kwargs


@functools.lru_cache(maxsize=16)
def stop_criteria(tokenizer, stop: tuple[str, ...]) -> StopStringCriteria:
    """transformers' stop-string criteria, built once per tokenizer and stops: building it reads and
    preprocesses the whole vocabulary (0.7 s for Gemma's 262k tokens, on every generate call when given
    as `stop_strings=`); it keeps no state between calls."""
    return StopStringCriteria(tokenizer, list(stop))
