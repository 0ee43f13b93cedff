"""Thirty nights of a simulated user on the tiny model: each night continues the serving generation on a
bounded sample, so its size stays the same however long the history grows, and the first lesson is kept.

(Wall-clock time per night is measured side by side in bench/learning.py, not here.)
"""

from bot.config import TrainingSettings
from bot.lineage import adapter_name
from training import scenarios
from training.gate import pick_accuracy
from training.rollover import run_rollover

USER = "test:fact"
NIGHTS = 30
PICKS_A_NIGHT = 12


def test_thirty_nights_cost_the_same_each_night_and_keep_the_first_lesson(settings, store, tiny_backend):
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

    nights = []
    for night in range(NIGHTS):
        scenarios.add_picks(store, settings, tiny_backend.count_tokens, fact, USER, PICKS_A_NIGHT,
                            start=night * PICKS_A_NIGHT)
        [outcome] = run_rollover(settings, backend=tiny_backend)
        assert outcome.status == "promoted", (night, outcome.reason)
        nights.append(outcome.metrics)
        if night == 0:
            generation = store.serving(USER)
            tiny_backend.load_adapter(adapter_name(generation), generation["path"])
            after_first_night = pick_accuracy(tiny_backend, first_lesson, adapter_name(generation))
            tiny_backend.model = tiny_backend.model.unload()

    # the history grew thirtyfold; each night trained the same number of pairs and steps
    assert nights[-1]["picks"] == NIGHTS * PICKS_A_NIGHT
    assert all(m["train_pairs"] == settings.training.pairs_per_night for m in nights[2:])
    assert len({m["dpo_steps"] for m in nights[2:]}) == 1
    assert all(m["warm_start"] for m in nights[1:]) and not nights[0]["warm_start"]
    assert all(m["replay_pairs"] >= 6 for m in nights[2:])
    assert all(m["new_picks"] == PICKS_A_NIGHT for m in nights)
    # every pick is tested once before it is learned: the serving generation, on each night's new picks
    assert "serving_accuracy_on_new" not in nights[0]
    assert all(m["serving_tested_pairs"] == PICKS_A_NIGHT for m in nights[1:])

    # what the first night taught is still there on night 30
    generation = store.serving(USER)
    assert generation["number"] == NIGHTS
    tiny_backend.load_adapter(adapter_name(generation), generation["path"])
    last = pick_accuracy(tiny_backend, first_lesson, adapter_name(generation))
    assert after_first_night > base_accuracy, (base_accuracy, after_first_night)
    assert last >= after_first_night - 0.1, (base_accuracy, after_first_night, last)
