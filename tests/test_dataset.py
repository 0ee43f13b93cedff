"""Training data from stored picks and thumbs, and a KTO stage on the tiny model."""

from bot.engine import UserRef
from tests.conftest import LENIENT, configure, make_picks
from bot.config import TrainingSettings
from training.dataset import overdone_pairs, pick_pairs, plan_night, trim_prompt
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


def test_a_reply_with_an_added_piece_is_also_preferred_over_the_piece_twice():
    def rejected_of(chosen, rejected):
        return [p["rejected"] for p in overdone_pairs([{"chosen": chosen, "rejected": rejected, "pick_id": 1}])]

    assert rejected_of("걷자냥!", "걷자!") == ["걷자냥냥!"]
    assert rejected_of("좋다냥! 가자냥!", "좋다! 가자!") == ["좋다냥냥! 가자냥냥!"]  # every place it was added
    assert rejected_of("안녕 몽실아!", "안녕!") == ["안녕 몽실아 몽실아!"]
    assert rejected_of("몽실이 귀여워", "고양이 귀여워") == []       # a piece replaced, not added
    assert rejected_of("떡볶이 어때?", "나도 졸려") == []            # different sentences: nothing to double
    assert rejected_of("좋다냥! 가자멍!", "좋다! 가자!") == []       # two different pieces
    [pair] = overdone_pairs([{"chosen": "걷자냥!", "rejected": "걷자!", "pick_id": 7, "prompt": "p"}])
    assert pair["overdone"] and pair["pick_id"] == 7 and pair["prompt"] == "p" and pair["chosen"] == "걷자냥!"


def night_settings(**changes) -> TrainingSettings:
    return TrainingSettings(**{"heldout_fraction": 0.25, "min_heldout_picks": 2, "pairs_per_night": 24,
                               "replay_share": 0.25, "max_rejected_per_pick": 1, **changes})


async def test_the_first_night_holds_out_a_rotating_share_of_picks_and_trains_the_rest(engine, store):
    await make_picks(engine, ALICE, 12)
    cfg = night_settings()
    data = plan_night(store, [ALICE.id], cfg, night=1)
    train_ids = {p["pick_id"] for p in data.train_pairs}
    heldout_ids = {p["pick_id"] for p in data.heldout_pairs}
    assert len(heldout_ids) == 3 and not train_ids & heldout_ids and len(train_ids | heldout_ids) == 12
    assert data.new_picks == data.picks == 12 and data.replay_pairs == 0
    assert data.last_pick_id == max(train_ids | heldout_ids) and sorted(heldout_ids) == data.heldout_pick_ids
    newest = max(train_ids | heldout_ids)
    nights = [set(plan_night(store, [ALICE.id], cfg, night=n).heldout_pick_ids) for n in range(1, 9)]
    assert len(set(map(frozenset, nights))) > 1           # a different share each night
    assert any(newest not in held for held in nights)     # the newest pick is usually trained at once
    store.update_user(ALICE.id, learning_opt_out=1)
    assert plan_night(store, [ALICE.id], cfg).picks == 0


async def test_a_night_continues_the_serving_generation_within_a_bounded_budget(engine, store):
    await make_picks(engine, ALICE, 40)
    cfg = night_settings()
    first = plan_night(store, [ALICE.id], cfg, night=1)
    serving = {"last_pick_id": first.last_pick_id}
    await make_picks(engine, ALICE, 8)
    second = plan_night(store, [ALICE.id], cfg, serving, first.heldout_pick_ids, night=2)
    trained = [p["pick_id"] for p in second.train_pairs]
    assert second.new_picks == 8 and len(trained) <= cfg.pairs_per_night
    # last night's held-out picks are learned tonight; tonight's come only from the new picks
    assert set(first.heldout_pick_ids) <= set(trained)
    assert min(second.heldout_pick_ids) > first.last_pick_id and not set(second.heldout_pick_ids) & set(trained)
    # the rest of the budget replays older picks, at least replay_share of it
    assert second.replay_pairs >= cfg.replay_share * cfg.pairs_per_night
    assert len(trained) == cfg.pairs_per_night == len(set(trained))
    # the serving generation is tested on every new pick (trained tonight or held out), and on nothing else
    new_ids = {i for i in store.pick_ids(ALICE.id) if i > first.last_pick_id}
    tested = [p["pick_id"] for p in second.new_train_pairs] + second.heldout_pick_ids
    assert set(tested) == new_ids and len(tested) == 8

    await make_picks(engine, ALICE, 60)  # a long history: the night's size stays the budget
    third = plan_night(store, [ALICE.id], cfg, {"last_pick_id": second.last_pick_id}, second.heldout_pick_ids,
                       night=3)
    assert len(third.train_pairs) == cfg.pairs_per_night and third.replay_pairs >= 4
    assert third.new_picks == 60 and len(third.heldout_pick_ids) == 15


async def test_thumbs_add_a_kto_stage(engine, settings, store):
    configure(settings, LENIENT)
    settings.training.kto_min_thumbs = 6
    await make_picks(engine, ALICE, 8)
    picked = [t for t in store.db.query("SELECT id FROM turns WHERE source = 'picked'")]
    for i, turn in enumerate(picked):
        store.set_reaction(ALICE.id, turn["id"], 1 if i % 2 else -1, "👍" if i % 2 else "👎")
    thumbs = plan_night(store, [ALICE.id], settings.training).thumbs
    assert len(thumbs) == len(picked) and {t["label"] for t in thumbs} == {True, False}
    [outcome] = run_rollover(settings)
    assert outcome.metrics["thumbs"] == len(picked) and "kto_loss" in outcome.metrics
