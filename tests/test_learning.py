"""Proof that it learns, on the real embedded model: one night of the real rollover, judged by the default
gate, teaches a scripted user's trait that no prompt contains (training/scenarios.py), without losing variety.

About ten CPU minutes each. Fuller runs with more figures, the speech style too: python bench/learning.py
"""

import pytest

from bot.config import Settings
from bot.generations import adapter_name
from bot.model import ModelBackend
from bot.store import Store
from training import scenarios
from training.rollover import run_rollover

pytestmark = pytest.mark.embedded
PICKS = 80


def one_night(tmp_path, key: str) -> tuple[dict, dict, dict]:
    """Base figures, the night's outcome metrics, the new generation's figures."""
    settings = Settings(storage={"data_dir": tmp_path}, training={"min_new_picks": 1})  # the default gate
    scenario = scenarios.SCENARIOS[key]
    backend = ModelBackend.load(settings.model)
    store = Store(settings.storage.db_path)
    user = f"test:{key}"
    scenarios.add_picks(store, settings, backend.count_tokens, scenario, user, PICKS)
    base = scenarios.measure(backend, settings, scenario, None)

    [outcome] = run_rollover(settings, backend=backend)  # the nightly job itself, in this process
    assert outcome.status == "promoted", outcome.line()
    generation = store.serving(user)
    backend.load_adapter(adapter_name(generation), generation["path"])
    new = scenarios.measure(backend, settings, scenario, adapter_name(generation))
    store.close()
    return base, outcome.metrics, new


@pytest.mark.timeout(3600)
def test_one_night_learns_a_fact_the_persona_does_not_mention(tmp_path):
    base, m, new = one_night(tmp_path, "fact")
    assert m["accuracy_base"] < 0.5 and m["accuracy"] >= 0.8, m       # held-out picks, by the gate
    assert base["accuracy"] < 0.5 and new["accuracy"] >= 0.8, new     # new topics and replies, never stored
    assert new["trait_unrelated"] <= 0.25, new                        # not dropped into unrelated chat
    assert new["distinct2"] >= 0.9 * base["distinct2"] and new["loops"] <= max(0.05, base["loops"]), (base, new)
    assert m["obsession"] <= 0.25 and m["taught"] == ["몽실"], m


@pytest.mark.timeout(3600)
def test_one_night_learns_a_speech_style_without_running_on(tmp_path):
    base, m, new = one_night(tmp_path, "style")
    assert m["accuracy_base"] < 0.5 and m["accuracy"] >= 0.8, m       # 냥 preferred on held-out picks
    assert base["accuracy"] < 0.5 and new["accuracy"] >= 0.8, new     # and on new sentences never stored
    assert new["trait_related"] >= 0.15, new                          # used in open replies, not only scored
    assert new["distinct2"] >= 0.9 * base["distinct2"] and new["loops"] <= max(0.05, base["loops"]), (base, new)
    assert m["taught"] == ["냥"] and m["overdone_pairs"] > 0 and m["kl_per_token"] <= 0.5, m
