"""What the model thought of its own samples, read while it sampled them (no second pass over the prompt).

    recorder = SignalRecorder(model.get_decoder())
    kwargs = generate_kwargs(sampling, tokenizer, stop, recorder=recorder)
    with recorder.watching():
        output = model.generate(**inputs, **kwargs)
    logprobs, hidden = recorder.finish(output[:, -1])      # [rows, steps], [rows, steps, hidden size]
    count = reply_tokens(tokenizer, new_ids_of_a_row, stop, end_ids)
    mean_logprob, mean_state = logprobs[row, :count].mean(), hidden[row, :count].mean(0)

Per reply, over its own tokens (not the stop that ended it): the mean log-probability the model gave
them, from its raw distribution (before temperature, top-p and repetition penalty, which only shape the
draw), and the mean of the last hidden states that predicted them; and its relevance: the mean
log-probability of its first OPENING tokens minus the same given the persona alone (one more pass,
bot/serving/local.py `_relevance`; interface.OPENING). bot/ranking.py ranks replies by these.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import LogitsProcessor



class SignalRecorder(LogitsProcessor):
    """A logits processor that keeps, per row, the raw log-prob of every sampled token, plus a forward hook
    on the decoder that keeps the last hidden state of every step. It must run before any processor that
    changes the scores (`generate_kwargs(..., recorder=...)` puts it first)."""

    def __init__(self, decoder: torch.nn.Module, end_ids: frozenset[int] = frozenset()):
        self.decoder = decoder
        self.end_ids = end_ids  # the model's end-of-text tokens (for `min_new_tokens`, see EndNotBefore)
        self.logprobs: list[torch.Tensor] = []   # per step: [rows], the log-prob of the token drawn there
        self.hidden: list[torch.Tensor] = []     # per step: [rows, hidden], the state that predicted it
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last step's scores and their logsumexp

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._last is not None:  # the previous step's token is now the last input
            self.logprobs.append(self._logprob_of(input_ids[:, -1]))
        self._last = (scores, scores.float().logsumexp(dim=-1))
        return scores

    def _logprob_of(self, tokens: torch.Tensor) -> torch.Tensor:
        scores, total = self._last
        return scores.gather(-1, tokens[:, None])[:, 0].float() - total

    @contextlib.contextmanager
    def watching(self):
        handle = self.decoder.register_forward_hook(self._keep_state)
        try:
            yield self
        finally:
            handle.remove()

    def _keep_state(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        self.hidden.append(hidden[:, -1].float())

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[rows, steps] log-probs of the sampled tokens and [rows, steps, hidden] the states that predicted
        them; `last_tokens` are the tokens drawn at the last step (the output's last column)."""
        if self._last is not None:
            self.logprobs.append(self._logprob_of(last_tokens))
            self._last = None
        steps = len(self.logprobs)
        return torch.stack(self.logprobs, dim=1), torch.stack(self.hidden[-steps:], dim=1)


class EndNotBefore(LogitsProcessor):
    """transformers' minimum length as a processor that can run after the recorder: no end-of-text token
    among the first `tokens` new tokens (generate's own runs before every custom processor)."""

    def __init__(self, tokens: int, end_ids: frozenset[int]):
        self.tokens, self.end_ids = tokens, sorted(end_ids)
        self._start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._start is None:
            self._start = input_ids.shape[1]
        if input_ids.shape[1] - self._start >= self.tokens or not self.end_ids:
            return scores
        scores = scores.clone()
        scores[:, self.end_ids] = float("-inf")
        return scores


def reply_tokens(tokenizer, ids: list[int], stop: list[str] | tuple[str, ...], end_ids: set[int]) -> int:
    """How many of a row's sampled tokens make its reply: those before the end-of-text token, padding, or
    the token that completed a stop string (the smallest prefix whose text holds one)."""
    end = len(ids)
    for i, token in enumerate(ids):
        if token in end_ids:
            end = i
            break
    stops = [s for s in stop if s]
    if not stops or not any(s in tokenizer.decode(ids[:end]) for s in stops):
        return end
    low, high = 1, end
    while low < high:
        middle = (low + high) // 2
        if any(s in tokenizer.decode(ids[:middle]) for s in stops):
            high = middle
        else:
            low = middle + 1
    return low - 1
