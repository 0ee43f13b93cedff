"""Thirty nights of a simulated user on the tiny model: each night continues the serving generation on a
bounded sample, so its size never exceeds the budget however long the history grows; it learns only the
pairs the serving generation does not win yet (a night with nothing new to learn is skipped), and the
first lesson is kept.

(Wall-clock time per night is measured side by side in bench/learning.py, not here.)
"""

from bot.config import TrainingSettings
from bot.generations import adapter_name
from training import scenarios
from training.gate import pick_accuracy
from training.rollover import run_rollover

USER = "test:fact"
NIGHTS = 30
PICKS_A_NIGHT = 12


def test_thirty_nights_stay_in_budget_learn_only_what_is_new_and_keep_the_first_lesson(settings, store, tiny_backend):
    settings.training = TrainingSettings(min_new_picks=4, pairs_per_night=24, replay_share=0.25, epochs=1,
                                         batch_size=4, grad_accum=1, learning_rate=2e-3, min_heldout_picks=3,
                                         max_rejected_per_pick=1)
    for key, value in {"min_accuracy": 0.0, "min_gain_over_base": -1.0, "max_drop_from_current": 1.0,
                       "min_distinct2_ratio": 0.0,
                       "max_self_bleu_ratio": 100.0, "max_repetition_rate": 1.0, "length_band": (0.0, 100.0),
                       "max_kl_per_token": 1e9, "max_obsession": 1.0, "probe_contexts": 2,
                       "samples_per_context": 2}.items():
        setattr(settings.gate, key, value)
    fact = scenarios.SCENARIOS["fact"]
    first_lesson = scenarios.unseen_pairs(settings, tiny_backend.count_tokens, fact)
    base_accuracy = pick_accuracy(tiny_backend, first_lesson, None)

    nights, skipped = [], []
    for night in range(NIGHTS):
        scenarios.add_picks(store, settings, tiny_backend.count_tokens, fact, USER, PICKS_A_NIGHT,
                            start=night * PICKS_A_NIGHT)
        [outcome] = run_rollover(settings, backend=tiny_backend)
        if outcome.status == "skipped":
            assert outcome.reason.startswith("nothing new to learn"), (night, outcome.reason)
            skipped.append(night)
            continue
        assert outcome.status == "promoted", (night, outcome.reason)
        nights.append({**outcome.metrics, "night": night})
        if night == 0:
            generation = store.serving(USER)
            tiny_backend.load_adapter(adapter_name(generation), generation["path"])
            after_first_night = pick_accuracy(tiny_backend, first_lesson, adapter_name(generation))
            tiny_backend.model = tiny_backend.model.unload()

    budget = settings.training.pairs_per_night
    warm = nights[1:]
    assert skipped and len(warm) >= 5, (skipped, [m["night"] for m in nights])
    assert not nights[0]["warm_start"] and all(m["warm_start"] for m in warm)
    # the history grew thirtyfold; a night plans at most the budget, and trains only what it does not know
    assert all(m["planned_pairs"] == budget for m in warm if m["night"] >= 2)
    assert all(m["replay_pairs"] >= 6 for m in warm if m["night"] >= 2)
    assert all(m["train_pairs"] + m["known_pairs"] == m["planned_pairs"] for m in warm)
    assert all(m["train_pairs"] >= settings.training.batch_size for m in warm)
    assert all(m["dpo_steps"] <= budget // settings.training.batch_size for m in nights)
    # every pick is tested once before it is learned: the serving generation, on each night's new picks
    assert "serving_accuracy_on_new" not in nights[0]
    assert all(m["serving_tested_pairs"] == PICKS_A_NIGHT for m in warm if m["night"] - 1 not in skipped)
    assert all(m["serving_tested_pairs"] <= m["new_picks"] for m in warm)
    # a skipped night makes no generation: the picks wait for the next night that trains
    assert store.serving(USER)["number"] == len(nights)
    assert sum(m["new_picks"] for m in nights) == (nights[-1]["night"] + 1) * PICKS_A_NIGHT

    # what the first night taught is still there on night 30
    generation = store.serving(USER)
    tiny_backend.load_adapter(adapter_name(generation), generation["path"])
    last = pick_accuracy(tiny_backend, first_lesson, adapter_name(generation))
    assert after_first_night > base_accuracy, (base_accuracy, after_first_night)
    assert last >= after_first_night - 0.1, (base_accuracy, after_first_night, last)
