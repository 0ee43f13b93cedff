"""Proof that it learns, on the real embedded model: one night of the real rollover teaches a scripted
user's preference (their dog is called 콩이, not just 강아지) without losing variety.

About five CPU minutes. A fuller run with more figures: python bench/learning.py
"""

import pytest

from bot.config import SamplingSettings, Settings
from bot.lineage import adapter_name
from bot.model import ModelBackend
from bot.store import Store
from training import scripted
from training.gate import sample_stats
from training.rollover import run_rollover

pytestmark = pytest.mark.embedded
USER = "test:kong"


@pytest.mark.timeout(2400)  # about 7 CPU minutes on 2 cores; room for a busy machine
def test_one_night_learns_the_dogs_name_and_keeps_replies_varied(tmp_path):
    settings = Settings(storage={"data_dir": tmp_path}, training={"min_new_picks": 1},
                        gate={"probe_contexts": 5, "samples_per_context": 4})
    backend = ModelBackend.load(settings.model)
    store = Store(settings.storage.db_path)
    card = scripted.persona()
    pairs = scripted.add_scripted_picks(store, backend, card, USER, count=50)

    [outcome] = run_rollover(settings, backend=backend)  # the nightly job itself, in this process
    m = outcome.metrics
    assert m["accuracy_base"] < 0.5, m                       # the base prefers the plain word
    assert m["accuracy"] >= 0.8, m                           # held-out pick accuracy after one night
    assert outcome.status == "promoted", outcome.reason
    assert m["distinct2"] >= 0.9 * m["distinct2_base"] and m["repetition"] == 0, m

    generation = store.serving(USER)
    name = adapter_name(generation)
    backend.load_adapter(name, generation["path"])
    heldout = pairs[-10:]
    higher = 0
    for pair in heldout:
        [(base_lp, n)] = backend.completion_logprobs(pair["prompt"], [f" {pair['chosen']}\n"], None)
        [(new_lp, _)] = backend.completion_logprobs(pair["prompt"], [f" {pair['chosen']}\n"], name)
        higher += new_lp > base_lp
    assert higher >= 8, f"only {higher}/10 held-out replies with the name became more likely"

    # Where the dog does not belong, the name does not appear and the replies stay varied.
    open_prompts = [scripted.prompt_for(card, message, backend) for message in scripted.OPEN_MESSAGES]
    gate = settings.gate.model_copy(update={"samples_per_context": 4})
    base = sample_stats(backend, open_prompts, None, gate, SamplingSettings())
    new = sample_stats(backend, open_prompts, name, gate, SamplingSettings())
    replies = [t for row in new["samples"] for t in row]
    assert scripted.trait_rate(replies) <= 0.1, replies
    assert new["distinct2"] >= 0.9 * base["distinct2"] and new["repetition"] == 0
    store.close()
