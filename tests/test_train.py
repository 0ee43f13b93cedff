"""What DPO is trained on: a rejected reply's end of turn is left out of the loss; a chosen reply's line break
counts, but not the end-of-text token TRL appends to transcript replies (the sampler stops at the line break).
And when it stops: once the pairs are won by `training.stop_margin`, not after every pass regardless."""

from __future__ import annotations

from transformers import AutoTokenizer

from bot.config import TrainingSettings
from training import scenarios
from training.train import rejected_end_unjudged, train_adapter


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _judged(tokenizer, batch, row: int) -> str:
    """The completion text the loss sees in `row` of a collated batch."""
    keep = batch["completion_mask"][row].bool()
    return tokenizer.decode(batch["input_ids"][row][keep])


def test_a_rejected_reply_is_judged_without_its_line_break_and_end_of_text(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    collate = rejected_end_unjudged(tokenizer, TrainingSettings())
    eos = [tokenizer.eos_token_id]
    batch = collate.torch_call([
        {"prompt_ids": _ids(tokenizer, "나: 안녕\n하루:"), "chosen_ids": _ids(tokenizer, " 라면 어때?\n") + eos,
         "rejected_ids": _ids(tokenizer, " 라면 어때\n\n") + eos},
        {"prompt_ids": _ids(tokenizer, "나: 배고파\n하루:"), "chosen_ids": _ids(tokenizer, " 저녁 뭐 먹지?\n") + eos,
         "rejected_ids": _ids(tokenizer, " 고생했어~\n") + eos},
    ])
    assert _judged(tokenizer, batch, 0) == " 라면 어때?\n"  # chosen rows keep their line break
    assert _judged(tokenizer, batch, 1) == " 저녁 뭐 먹지?\n"
    assert _judged(tokenizer, batch, 2) == " 라면 어때"  # rejected rows lose theirs, and only that
    assert _judged(tokenizer, batch, 3) == " 고생했어~"
    assert batch["attention_mask"][3].sum() == len(_ids(tokenizer, "나: 배고파\n하루: 고생했어~\n")) + 1


def test_a_rejected_reply_that_is_only_an_ending_keeps_one_token(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    collate = rejected_end_unjudged(tokenizer, TrainingSettings())
    batch = collate.torch_call([{"prompt_ids": _ids(tokenizer, "나: 안녕\n하루:"),
                                 "chosen_ids": _ids(tokenizer, " 안녕!\n"),
                                 "rejected_ids": _ids(tokenizer, "\n") + [tokenizer.eos_token_id]}])
    assert batch["completion_mask"][1].sum() == 1


def test_with_a_chat_template_the_chosen_reply_keeps_its_end_of_turn(tiny_chat_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model_dir)
    collate = rejected_end_unjudged(tokenizer, TrainingSettings(), transcript=False)
    eos = [tokenizer.eos_token_id]  # standing in for a template's end-of-turn token
    batch = collate.torch_call([{"prompt_ids": _ids(tokenizer, "<|user|>안녕\n<|assistant|>"),
                                 "chosen_ids": _ids(tokenizer, "라면 어때?") + eos + _ids(tokenizer, "\n"),
                                 "rejected_ids": _ids(tokenizer, "고생했어~") + eos + _ids(tokenizer, "\n")}])
    assert _judged(tokenizer, batch, 0) == "라면 어때?<eos>\n"
    assert _judged(tokenizer, batch, 1) == "고생했어~"


def test_a_night_stops_once_its_pairs_are_won_and_a_warm_start_that_knows_them_stops_at_once(settings, tiny_backend,
                                                                                           tmp_path):
    pairs = scenarios.unseen_pairs(settings, tiny_backend.count_tokens, scenarios.SCENARIOS["fact"]) * 2
    cfg = TrainingSettings(epochs=4, batch_size=4, grad_accum=4, learning_rate=2e-3, stop_margin=None)
    first = train_adapter(tiny_backend, pairs, [], cfg, tmp_path / "first")
    assert first.metrics["dpo_steps"] == first.metrics["dpo_max_steps"] > 4  # no stop: every pass runs
    learned = first.metrics["train_margin"]
    assert learned > 0.1

    # continuing the adapter that already wins these pairs: the first window of steps (32 pairs) is won
    again = train_adapter(tiny_backend, pairs, [], cfg.model_copy(update={"stop_margin": learned / 2}),
                          tmp_path / "again", start_from=tmp_path / "first")
    assert again.metrics["warm_start"]
    assert again.metrics["dpo_steps"] == 2 < again.metrics["dpo_max_steps"]

    # the same night from a fresh adapter has to learn them first
    fresh = train_adapter(tiny_backend, pairs, [], cfg.model_copy(update={"stop_margin": learned / 2}),
                          tmp_path / "fresh")
    assert fresh.metrics["dpo_steps"] > 2


def test_a_taught_style_is_also_trained_against_the_style_overdone(settings, tiny_backend, tmp_path):
    style = scenarios.unseen_pairs(settings, tiny_backend.count_tokens, scenarios.SCENARIOS["style"])
    fact = scenarios.unseen_pairs(settings, tiny_backend.count_tokens, scenarios.SCENARIOS["fact"])[:4]
    cfg = TrainingSettings(epochs=1, batch_size=4, grad_accum=1, stop_margin=None)
    night = train_adapter(tiny_backend, style + fact, [], cfg, tmp_path / "on")
    # one more pair per styled pick (걷자냥! over 걷자냥냥!); a named fact replaces a word: none for it
    assert night.metrics["overdone_pairs"] == len(style) and night.pairs == 2 * len(style) + len(fact)
    off = train_adapter(tiny_backend, style + fact, [], cfg.model_copy(update={"overdone_pairs": False}),
                        tmp_path / "off")
    assert off.metrics["overdone_pairs"] == 0 and off.pairs == len(style) + len(fact)
