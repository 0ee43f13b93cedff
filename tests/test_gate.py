"""The gate's statistics: bootstrap intervals over picks, what was taught, and the decision."""

from bot.config import GateSettings
from training.gate import bootstrap, decide, taught_markers, verdict

GATE = GateSettings()


def figures(**changes) -> dict:
    m = {"accuracy": 0.8, "accuracy_low": 0.7, "accuracy_high": 0.9, "accuracy_base": 0.4, "gain_low": 0.2,
         "gain_high": 0.5, "heldout_pairs": 40, "heldout_picks": 40, "distinct2": 0.9, "distinct2_base": 0.9,
         "self_bleu": 0.2, "self_bleu_base": 0.2, "repetition": 0.0, "repetition_base": 0.0, "length": 10.0,
         "length_base": 10.0, "kl_per_token": 0.1}
    return {**m, **changes}


def test_the_interval_narrows_with_more_picks_and_keeps_the_pairs_of_a_pick_together():
    few = bootstrap(list(range(12)), [1.0] * 7 + [0.0] * 5, 0.9)
    many = bootstrap(list(range(120)), ([1.0] * 7 + [0.0] * 5) * 10, 0.9)
    assert few[0] < many[0] < 7 / 12 < many[1] < few[1]
    assert many[1] - many[0] < 0.2 < few[1] - few[0]
    # two identical pairs per pick carry no more evidence than one: the interval stays as wide
    twice = bootstrap([i // 2 for i in range(24)], [v for v in [1.0] * 7 + [0.0] * 5 for _ in (0, 1)], 0.9)
    assert abs((twice[1] - twice[0]) - (few[1] - few[0])) < 0.05


def test_a_noisy_small_held_out_set_that_clearly_beats_the_base_is_not_refused_by_one_threshold():
    # 0.58 measured on 24 pairs where the base scored 0.36: learned, even if below 0.6 by one pair
    m = figures(accuracy=0.58, accuracy_low=0.42, accuracy_high=0.75, accuracy_base=0.36, gain_low=0.05,
                gain_high=0.4)
    assert decide(m, GATE) == []
    # confidently below the minimum, or no confident gain over the base: refused, with the interval
    [reason] = decide(figures(accuracy=0.4, accuracy_low=0.3, accuracy_high=0.55), GATE)
    assert "below 0.60" in reason and "0.30-0.55" in reason
    [reason] = decide(figures(gain_low=-0.05), GATE)
    assert "does not beat the base" in reason and "-0.05" in reason


def test_what_was_taught_is_the_piece_a_chosen_reply_adds_to_the_same_sentence():
    fact = [{"chosen": f"몽실이 {t}", "rejected": f"고양이 {t}"} for t in ("좋겠다!", "귀엽다 ㅎㅎ", "괜찮아?")]
    style = [{"chosen": t[:-1] + "냥" + t[-1], "rejected": t} for t in ("좋겠다!", "먹자!", "고생했다!")]
    unrelated = [{"chosen": "떡볶이 어때?", "rejected": "나도 졸려 ㅠㅠ"}, {"chosen": "한강 가자", "rejected": "오늘 뭐 했어?"}]
    assert taught_markers(fact + unrelated) == ["몽실"]
    assert taught_markers(style) == ["냥"]
    assert taught_markers(unrelated) == []


def test_an_obsessed_generation_is_refused_and_the_verdict_names_it():
    m = figures(taught=["몽실"], obsession=0.6, obsession_base=0.0, obsession_contexts=8)
    [reason] = decide(m, GATE)
    assert "60% of replies to unrelated messages bring up 몽실" in reason
    assert decide({**m, "obsession": 0.1}, GATE) == []
    line = verdict("rejected", m)
    assert line.startswith("rejected: accuracy 0.80 [0.70-0.90] vs base 0.40 on 40 held-out pairs")
    assert "off-topic 몽실 60% (base 0%)" in line
