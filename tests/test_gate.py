"""The gate's statistics: bootstrap intervals over picks, what was taught, and the decision."""

from bot.config import GateSettings
from training.gate import bootstrap, decide, length_ratio_interval, taught_markers, verdict

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


def test_the_kl_limit_judges_what_moved_besides_the_taught_piece():
    m = figures(taught=["냥"], kl_all_per_token=1.1, kl_per_token=0.7)
    [reason] = decide(m, GATE)
    assert reason == "KL from the base outside 냥 0.700 nats/token is over 0.5"
    assert decide({**m, "kl_per_token": 0.4}, GATE) == []  # 냥 itself (12 nats a use) is the lesson
    assert decide(figures(kl_per_token=0.7), GATE) == ["KL from the base 0.700 nats/token is over 0.5"]


def test_reply_length_is_judged_by_an_interval_over_contexts():
    base = [[8, 9, 10, 7, 9, 11]] * 12
    # one draw where two contexts rambled to the token limit: 1.5x in the mean, but not in most contexts
    rambling = [[9, 10, 11, 8, 9, 12]] * 10 + [[48, 48, 47, 48, 46, 48]] * 2
    low, high = length_ratio_interval(base, rambling, 0.9)
    assert low < 1.4 < 1.5 < high
    assert decide(figures(length=15.0, length_low=low, length_high=high), GATE) == []
    # every context runs on: the interval is wholly outside the band, refused with it
    running = [[20, 22, 19, 21, 18, 24]] * 12
    low, high = length_ratio_interval(base, running, 0.9)
    assert 1.4 < low <= high
    [reason] = decide(figures(length=21.0, length_low=low, length_high=high), GATE)
    assert reason.startswith("reply length is 2.10x the base's (90% interval") and "outside [0.7, 1.4]" in reason
    assert length_ratio_interval(base, base, 0.9) == (1.0, 1.0)
    line = verdict("promoted", figures(length=15.0, length_low=1.1, length_high=2.0))
    assert "length 1.50x [1.10-2.00]" in line
