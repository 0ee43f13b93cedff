"""Batched scoring and sampling for the promotion gate: the same numbers as one item at a time."""

import pytest
import torch

from bot.config import ModelSettings, SamplingSettings
from bot.model import ModelBackend

# prompts and completions of mixed lengths; "오늘 하" + "루 ..." merges tokens across the boundary
ITEMS = [
    ("나: 안녕\n하루:", " 배고파\n"),
    ("나: 안녕\n하루:", " 안녕! 오늘 하루 어땠어? 나는 배고파. 저녁 뭐 먹지?\n"),
    ("a", "b"),
    ("오늘 하", "루 어땠어?"),
    ("회사에서 발표했는데 떨렸어. 고생했어~ 진짜 멋지다 ㅎㅎ\nHello! How was your day?", " I am hungry."),
    ("Hello! How was your day? I am hungry. What should we eat tonight?\nSam:", " 라면"),
    ("주말에 뭐 해?", " 강아지 산책 가자!\n"),
    ("주말에 뭐 해?", ""),  # nothing to score
]
GREEDY = SamplingSettings(top_k=1, max_new_tokens=8)
# longer than the tiny model's sliding window (64 tokens), by different amounts, next to a short one
LONG = ["나: 안녕\n하루:", "회사에서 발표했는데 떨렸어. 고생했어~ " * 6 + "\n하루:", "Hello! How was your day? " * 14 + "\nSam:"]
PROMPTS = ["a", "나: 안녕\n하루:", "회사에서 발표했는데 떨렸어. 고생했어~ 진짜 멋지다 ㅎㅎ\nSam:", "주말에 뭐 해?"]


def reference(backend: ModelBackend, prompt: str, completion: str, adapter: str | None = None):
    """The per-item computation completion_logprobs used to do: a full forward, log_softmax, gather."""
    add = not backend.use_chat_template
    prompt_ids = backend.tokenizer(prompt, add_special_tokens=add).input_ids
    ids = backend.tokenizer(prompt + completion, add_special_tokens=add).input_ids
    start = len(prompt_ids)
    if ids[:start] != prompt_ids:
        start = next(i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b)
    if start == len(ids):
        return 0.0, 0
    with torch.inference_mode(), backend._use_adapter(adapter):
        logits = backend.model(torch.tensor([ids])).logits[0, start - 1:-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[start:])[:, None])
    return logprobs.sum().item(), len(ids) - start


def assert_matches(got, expected):
    assert len(got) == len(expected)
    for (lp, n), (ref_lp, ref_n) in zip(got, expected):
        assert n == ref_n
        assert lp == pytest.approx(ref_lp, abs=1e-4)


def make_lora(model_dir, path, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(base, config).save_pretrained(path)
    return path


def test_the_boundary_merge_case_is_in_the_items(tiny_backend):
    tokenize = tiny_backend.tokenizer
    prompt, completion = ITEMS[3]
    assert tokenize(prompt + completion).input_ids[:len(tokenize(prompt).input_ids)] != tokenize(prompt).input_ids


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batched_scores_equal_one_forward_per_item(tiny_backend, batch_size):
    expected = [reference(tiny_backend, p, c) for p, c in ITEMS]
    assert_matches(tiny_backend.score_completions(ITEMS, batch_size=batch_size), expected)
    assert tiny_backend._split is not None  # the decoder-then-head path ran, not the fallback


def test_completion_logprobs_is_the_batched_scorer(tiny_backend):
    prompt = "나: 안녕\n하루:"
    completions = [" 배고파\n", " 안녕! 오늘 하루 어땠어?\n", ""]
    assert tiny_backend.completion_logprobs(prompt, completions) == \
        tiny_backend.score_completions([(prompt, c) for c in completions])
    assert_matches(tiny_backend.completion_logprobs(prompt, completions),
                   [reference(tiny_backend, prompt, c) for c in completions])
    assert tiny_backend.score_completions([]) == []


def test_adapters_apply_in_batched_scoring_and_none_is_the_base(tiny_backend, tiny_model_dir, tmp_path):
    base = [reference(tiny_backend, p, c) for p, c in ITEMS]
    tiny_backend.load_adapter("gen-1", make_lora(tiny_model_dir, tmp_path / "a"))
    with_adapter = [reference(tiny_backend, p, c, "gen-1") for p, c in ITEMS]
    assert with_adapter[0][0] != pytest.approx(base[0][0], abs=1e-3)  # the adapter matters
    assert_matches(tiny_backend.score_completions(ITEMS, "gen-1", batch_size=3), with_adapter)
    assert_matches(tiny_backend.score_completions(ITEMS, None, batch_size=3), base)
    assert_matches(tiny_backend.score_completions(ITEMS, "gen-1"), with_adapter)  # the order of calls is no matter


def test_chat_template_models_score_the_same_way(tiny_chat_model_dir):
    backend = ModelBackend.load(ModelSettings(name=str(tiny_chat_model_dir), dtype="float32", prompt_format="chat"))
    assert backend.use_chat_template
    prompts = [backend.chat_prompt([{"role": "user", "content": text}]) for text in ("안녕", "오늘 하루 어땠어? 나는 배고파.")]
    items = [(prompts[0], "배고파\n"), (prompts[1], "라면 어때?"), (prompts[0], "Hello! How was your day?\n")]
    assert_matches(backend.score_completions(items, batch_size=2), [reference(backend, p, c) for p, c in items])


def test_final_logit_softcapping_is_applied_as_the_model_does(tiny_backend):
    plain = tiny_backend.score_completions(ITEMS)
    tiny_backend.model.config.final_logit_softcapping = 0.05  # the tiny model's logits are ~0.1: this bends them
    tiny_backend._split_for = None  # check the split again, now against the capped forward
    capped = tiny_backend.score_completions(ITEMS)
    assert tiny_backend._split is not None  # the split path passed its check and ran
    assert capped[0][0] != pytest.approx(plain[0][0], abs=1e-3)
    assert_matches(capped, [reference(tiny_backend, p, c) for p, c in ITEMS])


def test_a_model_whose_logits_are_more_than_the_head_runs_whole(tiny_backend):
    forward = tiny_backend.model.forward

    def scaled(*args, **kwargs):  # like Cohere's logit_scale, which the split path does not know
        output = forward(*args, **kwargs)
        output.logits = output.logits * 0.5
        return output

    tiny_backend.model.forward = scaled
    expected = [reference(tiny_backend, p, c) for p, c in ITEMS]
    assert_matches(tiny_backend.score_completions(ITEMS, batch_size=3), expected)
    assert tiny_backend._split is None


def test_sample_many_gives_n_samples_per_prompt_cut_at_the_stop(tiny_backend):
    results = tiny_backend.sample_many(PROMPTS, 3, SamplingSettings(max_new_tokens=20), stop=["\n", "하"],
                                       batch_rows=4)
    assert len(results) == len(PROMPTS)
    for samples in results:
        assert len(samples) == 3
        for s in samples:
            assert "\n" not in s.text and "하" not in s.text
            assert 0 < s.new_tokens <= 20
    assert tiny_backend.sample_many([], 3, GREEDY, []) == []


@pytest.mark.parametrize("batch_rows", [1, 3, 32])
def test_a_batched_row_equals_the_prompt_sampled_alone(tiny_backend, batch_rows):
    results = tiny_backend.sample_many(PROMPTS, 2, GREEDY, stop=[], batch_rows=batch_rows)
    for prompt, samples in zip(PROMPTS, results):
        alone = tiny_backend.sample(prompt, 1, GREEDY, stop=[])[0]
        assert samples == [alone, alone]
        assert alone.new_tokens > 0


def test_adapters_apply_in_sample_many(tiny_backend, tiny_model_dir, tmp_path):
    tiny_backend.load_adapter("gen-1", make_lora(tiny_model_dir, tmp_path / "a"))
    tuned = tiny_backend.sample_many(PROMPTS, 2, GREEDY, stop=[], adapter="gen-1")
    base = tiny_backend.sample_many(PROMPTS, 2, GREEDY, stop=[])
    for prompt, tuned_samples in zip(PROMPTS, tuned):
        assert tuned_samples == 2 * tiny_backend.sample(prompt, 1, GREEDY, stop=[], adapter="gen-1")
    assert tuned != base


def test_sample_many_on_a_chat_template_model(tiny_chat_model_dir):
    backend = ModelBackend.load(ModelSettings(name=str(tiny_chat_model_dir), dtype="float32", prompt_format="chat"))
    prompts = [backend.chat_prompt([{"role": "user", "content": text}]) for text in ("안녕", "오늘 하루 어땠어? 나는 배고파.")]
    results = backend.sample_many(prompts, 2, GREEDY, stop=[])
    assert [r[0] for r in results] == [backend.sample(p, 1, GREEDY, stop=[])[0] for p in prompts]


def test_seeded_sample_many_is_reproducible(tiny_model_dir):
    backend = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="float32", seed=7))
    sampling = SamplingSettings(max_new_tokens=10)
    assert backend.sample_many(PROMPTS, 3, sampling, []) == backend.sample_many(PROMPTS, 3, sampling, [])


def test_prompts_past_the_sliding_window_score_and_sample_the_same(tiny_backend):
    lengths = [tiny_backend.count_tokens(p) for p in LONG]
    window = tiny_backend.model.config.sliding_window
    assert lengths[0] < window < lengths[1] < lengths[2] - 20
    items = [(p, c) for p in LONG for c in (" 배고파\n", " 안녕! 오늘 하루 어땠어? 나는 배고파.\n")]
    assert_matches(tiny_backend.score_completions(items), [reference(tiny_backend, p, c) for p, c in items])
    greedy = SamplingSettings(top_k=1, max_new_tokens=16)
    results = tiny_backend.sample_many(LONG, 2, greedy, stop=[])
    assert [r[0] for r in results] == [tiny_backend.sample(p, 1, greedy, stop=[])[0] for p in LONG]
    assert all(r[0] == r[1] for r in results)


def test_per_token_log_probs_are_the_summed_scores_token_by_token(tiny_backend, tiny_model_dir, tmp_path):
    tiny_backend.load_adapter("gen-1", make_lora(tiny_model_dir, tmp_path / "a"))
    tokens = tiny_backend.token_logprobs(ITEMS, "gen-1", batch_size=3)
    expected = [reference(tiny_backend, p, c, "gen-1") for p, c in ITEMS]
    assert [len(ids) for ids, _ in tokens] == [n for _, n in expected]
    assert_matches([(sum(lps), len(lps)) for _, lps in tokens], expected)
    for (prompt, completion), (ids, _) in zip(ITEMS, tokens):
        if ids:  # the completion's own tokens (a join across the boundary can take the prompt's last piece)
            assert tiny_backend.tokenizer.decode(ids).strip().endswith(completion.strip())


def test_the_gate_kl_is_told_apart_for_the_taught_piece(tiny_backend, tiny_model_dir, tmp_path):
    from training.gate import kl_per_token

    tiny_backend.load_adapter("gen-1", make_lora(tiny_model_dir, tmp_path / "a"))
    prompts = ["나: 안녕\n하루:", "주말에 뭐 해?"]
    samples = [[" 강아지 산책 가자!", " 배고파"], [" 오늘 강아지 어땠어?"]]
    items = [(p, t + "\n") for p, texts in zip(prompts, samples) for t in texts]
    new, old = tiny_backend.token_logprobs(items, "gen-1"), tiny_backend.token_logprobs(items, None)
    diffs = [[a - b for a, b in zip(n, o)] for (_, n), (_, o) in zip(new, old)]
    taught = []  # per item, the indexes of the run of tokens that spells the piece
    for ids, _ in new:
        runs = [range(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids) + 1)
                if tiny_backend.tokenizer.decode(ids[i:j]).strip() == "강아지"]
        taught.append(set(min(runs, key=len)) if runs else set())
    assert [bool(t) for t in taught] == [True, False, True]
    every = sum(map(sum, diffs)) / sum(map(len, diffs))
    outside = [d for row, skip in zip(diffs, taught) for i, d in enumerate(row) if i not in skip]

    assert kl_per_token(tiny_backend, prompts, samples, "gen-1") == pytest.approx((every, every), abs=1e-5)
    got_every, got_outside = kl_per_token(tiny_backend, prompts, samples, "gen-1", ["강아지"])
    assert got_every == pytest.approx(every, abs=1e-5)
    assert got_outside == pytest.approx(sum(outside) / len(outside), abs=1e-5)
    assert got_outside != pytest.approx(every, abs=1e-4)
