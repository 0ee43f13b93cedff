"""The nucleus sampler: exactly transformers' temperature + top-k + top-p, without sorting the vocabulary."""

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from bot.config import ModelSettings, SamplingSettings
from bot.model import ModelBackend
from bot.sampling import NucleusSampler, generate_kwargs


def reference(scores: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """transformers' own warpers, as generate(do_sample=True) applies them: the distribution drawn from."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, scores.clone()).softmax(dim=-1)


def dense(sampler: NucleusSampler, scores: torch.Tensor) -> torch.Tensor:
    probs, tokens = sampler.distribution(scores)
    out = torch.zeros_like(scores).scatter_add_(-1, tokens, probs)
    return out / out.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("temperature, top_p, top_k", [
    (0.9, 0.95, 0), (1.0, 0.5, 0), (0.7, 1.0, 0), (1.3, 0.9, 10), (0.9, 0.95, 200), (1.0, 0.99, 1)])
def test_the_distribution_is_transformers_top_p(temperature, top_p, top_k):
    torch.manual_seed(0)
    peaked = torch.randn(4, 5000) * 4     # the nucleus fits in the pool
    medium = torch.randn(3, 5000) * 2.5   # it fits in the wide pool (64 x 16) only
    flat = torch.randn(3, 5000) * 0.1     # neither: those rows are sorted in full
    for scores in (peaked, medium, flat, torch.cat([peaked, medium, flat])):
        sampler = NucleusSampler(temperature, top_p, top_k, pool=64)
        want, got = reference(scores, temperature, top_p, top_k), dense(sampler, scores)
        assert torch.equal(want > 0, got > 0)  # the same tokens may be drawn ...
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # ... with the same probabilities


def test_draws_follow_the_distribution_and_only_the_drawn_token_survives():
    torch.manual_seed(1)
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, -8.0]]).repeat(20_000, 1)
    sampler = NucleusSampler(1.0, 0.9, pool=4)
    out = sampler(None, scores)
    assert torch.isfinite(out).sum(dim=-1).eq(1).all()
    frequencies = torch.bincount(out.argmax(dim=-1), minlength=7) / len(scores)
    torch.testing.assert_close(frequencies, reference(scores[:1], 1.0, 0.9, 0)[0], atol=0.01, rtol=0)


def test_generate_samples_through_it_with_transformers_length_rules(tiny_model_dir):
    backend = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="float32", prompt_format="transcript"))
    inputs = backend.tokenizer("나: 안녕\n하루:", return_tensors="pt")
    sampling = SamplingSettings(max_new_tokens=12, min_new_tokens=12)
    with torch.inference_mode():
        torch.manual_seed(3)
        rows = backend.model.generate(**{k: v.repeat(4, 1) for k, v in inputs.items()},
                                      **generate_kwargs(sampling, backend.tokenizer))
        greedy = backend.model.generate(**inputs, do_sample=False, max_new_tokens=12,
                                        pad_token_id=backend.tokenizer.pad_token_id)
        top1 = backend.model.generate(**inputs, **generate_kwargs(SamplingSettings(top_k=1, max_new_tokens=12,
                                                                                   repetition_penalty=1.0),
                                                                  backend.tokenizer))
    new = rows[:, inputs.input_ids.shape[1]:]
    assert new.shape == (4, 12) and not (new == backend.tokenizer.eos_token_id).any()  # min_new_tokens held
    assert len({tuple(r.tolist()) for r in new}) > 1  # sampled, not greedy
    assert torch.equal(top1, greedy)
