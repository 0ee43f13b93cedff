"""Training data from stored picks and thumbs, and a KTO stage on the tiny model."""

from bot.engine import UserRef
from tests.test_rollover import LENIENT, configure, make_picks
from training.dataset import build_dataset, pick_pairs, trim_prompt
from training.rollover import run_rollover

ALICE = UserRef("test", "alice")


def words(text: str) -> int:
    return len(text.split())


def test_trimming_drops_the_oldest_dialogue_lines_never_the_reply():
    prompt = "persona line one\npersona two\n\nold one\nold two\nnew one\n하루:"
    assert trim_prompt(prompt, 3, 100, words) == prompt
    trimmed = trim_prompt(prompt, 3, 3 + words("persona line one\npersona two\n\nnew one\n하루:"), words)
    assert trimmed == "persona line one\npersona two\n\nnew one\n하루:"
    assert trim_prompt(prompt, 50, 10, words) is None  # not even the persona and the label fit


def test_pairs_cap_rejected_siblings_and_drop_identical_ones():
    record = {"prompt": "p", "chosen": "a", "rejected": ["b", " a ", "c", "d"], "context": [], "set_id": "s",
              "pick_id": 1}
    assert [(p["chosen"], p["rejected"]) for p in pick_pairs([record], 2)] == [("a", "b"), ("a", "c")]


async def test_split_by_time_keeps_the_newest_picks_out_of_training(engine, store):
    await make_picks(engine, ALICE, 10)
    data = build_dataset(store, [ALICE.id], heldout_fraction=0.2)
    train_ids = {p["pick_id"] for p in data.train_pairs}
    heldout_ids = {p["pick_id"] for p in data.heldout_pairs}
    assert train_ids and heldout_ids and max(train_ids) < min(heldout_ids)
    assert data.picks == len(train_ids | heldout_ids) and data.last_pick_id == max(heldout_ids)
    store.update_user(ALICE.id, learning_opt_out=1)
    assert build_dataset(store, [ALICE.id]).picks == 0


async def test_thumbs_add_a_kto_stage(engine, settings, store):
    configure(settings, LENIENT)
    settings.training.kto_min_thumbs = 6
    await make_picks(engine, ALICE, 8)
    picked = [t for t in store.db.query("SELECT id FROM turns WHERE source = 'picked'")]
    for i, turn in enumerate(picked):
        store.set_reaction(ALICE.id, turn["id"], 1 if i % 2 else -1, "👍" if i % 2 else "👎")
    thumbs = build_dataset(store, [ALICE.id]).thumbs
    assert len(thumbs) == len(picked) and {t["label"] for t in thumbs} == {True, False}
    [outcome] = run_rollover(settings)
    assert outcome.metrics["thumbs"] == len(picked) and "kto_loss" in outcome.metrics
