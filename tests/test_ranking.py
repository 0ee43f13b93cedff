"""Best-of-N offers: the model's own signals per sample (bot/serving/signals.py, the local generator), the
ranker (bot/ranking.py), and the engine storing every sample, learning from picks, opting out and forgetting.

All on the tiny random model: a real Gemma 3 generate path, checked against plain teacher-forced forwards.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from bot import ranking
from bot.config import RankingSettings, SamplingSettings, ServingSettings
from bot.engine import UserRef
from bot.prompt import Turn, build_prompt
from bot.sampling import generate_kwargs
from bot.serving import LocalGenerator, Pruning, Sample
from bot.serving.interface import OPENING
from bot.serving.signals import SignalRecorder, reply_tokens
from persona import PersonaLibrary

ALICE = UserRef("test", "alice", "Alice")


# -- the recorder: raw log-probs and last hidden states, read during generate -----------------------------

@pytest.mark.parametrize("min_new_tokens", [0, 10])  # 10: the minimum length must not hide the end token
def test_the_recorder_keeps_raw_logprobs_and_last_hidden_states(tiny_backend, min_new_tokens):
    model, tokenizer = tiny_backend.model, tiny_backend.tokenizer
    with torch.no_grad():  # 20x larger logits: a random model's are near uniform, where no penalty shows
        model.model.norm.weight.mul_(20).add_(19)  # Gemma's norm scales by (1 + weight)
    inputs = tokenizer(["안녕! 오늘 하루", "Hello! How was your day?", "나: 하루:"], return_tensors="pt",
                       padding=True, padding_side="left")
    assert inputs.attention_mask.min() == 0  # rows of different lengths: left padding is part of the test
    recorder = SignalRecorder(model.get_decoder())
    sampling = SamplingSettings(max_new_tokens=10, min_new_tokens=min_new_tokens, repetition_penalty=1.5)
    torch.manual_seed(3)
    with torch.inference_mode(), recorder.watching():
        output = model.generate(**inputs, **generate_kwargs(sampling, tokenizer, recorder=recorder))
    logprobs, hidden = recorder.finish(output[:, -1])
    start = inputs.input_ids.shape[1]
    new = output[:, start:]
    steps = new.shape[1]
    assert logprobs.shape == (3, steps) and hidden.shape == (3, steps, model.config.hidden_size)
    assert steps == 10 or min_new_tokens == 0

    # the same ids, teacher-forced in one plain forward
    mask = torch.cat([inputs.attention_mask, torch.ones_like(new)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        forward = model(input_ids=output, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    logits = forward.logits[:, start - 1:-1].float()  # position start-1+t predicts new token t
    raw = logits.log_softmax(-1).gather(-1, new[..., None])[..., 0]
    torch.testing.assert_close(logprobs, raw, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden, forward.hidden_states[-1][:, start - 1:-1].float(), atol=1e-4, rtol=1e-4)

    # what a recorder placed after the repetition penalty would have kept: clearly not what was recorded
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    penalised = torch.stack([
        penalty(output[:, :start + t], logits[:, t].clone()).log_softmax(-1).gather(-1, new[:, t:t + 1])[:, 0]
        for t in range(steps)], dim=1)
    assert (logprobs - penalised).abs().max() > 1e-2


# -- which sampled tokens make the reply ------------------------------------------------------------------

def test_reply_tokens_end_before_the_stop_and_at_end_of_text(tiny_backend):
    tokenizer = tiny_backend.tokenizer
    eos = tokenizer.eos_token_id
    ids = tokenizer("abc\nxyz").input_ids
    abc = len(tokenizer("abc").input_ids)
    assert 0 < abc < len(ids)
    assert reply_tokens(tokenizer, ids, ["\n"], {eos}) == abc
    assert reply_tokens(tokenizer, ids, ["END", "\n"], {eos}) == abc  # any of the stops
    assert reply_tokens(tokenizer, ids, [], {eos}) == len(ids)
    assert reply_tokens(tokenizer, ids, [""], {eos}) == len(ids)  # an empty stop is no stop
    assert reply_tokens(tokenizer, ids, ["END"], {eos}) == len(ids)
    assert reply_tokens(tokenizer, tokenizer("\nxyz").input_ids, ["\n"], {eos}) == 0
    # a stop spanning tokens ends before the token that completes it
    assert reply_tokens(tokenizer, ids, ["c\nx"], {eos}) == ids.index(tokenizer("x").input_ids[0])
    # end of text (or padding) ends the reply, and a stop after it does not count
    assert reply_tokens(tokenizer, tokenizer("ab").input_ids + [eos] + ids, ["\n"], {eos}) == \
        len(tokenizer("ab").input_ids)
    assert reply_tokens(tokenizer, ids[:2] + [tokenizer.pad_token_id] * 3, ["\n"],
                        {eos, tokenizer.pad_token_id}) == 2
    assert reply_tokens(tokenizer, [eos] + ids, ["\n"], {eos}) == 0

    # Korean: multi-byte characters split over byte-level tokens; the shortest prefix holding the stop
    korean = tokenizer("안녕! 오늘 하루 어땠어? 나는 배고파").input_ids
    completes = next(i for i in range(1, len(korean) + 1) if "하루" in tokenizer.decode(korean[:i]))
    assert reply_tokens(tokenizer, korean, ["하루"], {eos}) == completes - 1
    assert "하루" not in tokenizer.decode(korean[:completes - 1])


# -- the local generator's signals ------------------------------------------------------------------------

def haru_prompt(settings, backend):
    card = PersonaLibrary(settings.storage.persona_dir).get("haru")
    history = [Turn("char", "안녕! 오늘 하루 어땠어?"), Turn("user", "회사에서 발표했는데 떨렸어"),
               Turn("char", "고생했어~ 진짜 멋지다"), Turn("user", "배고파. 저녁 뭐 먹지?")]
    return build_prompt(card, history, count_tokens=backend.count_tokens, budget=settings.chat.max_context_tokens,
                        special_tokens=backend.special_tokens)


async def test_the_generator_scores_relevance_against_the_persona_alone(settings, tiny_backend):
    prompt = haru_prompt(settings, tiny_backend)
    assert prompt.prefix and prompt.text.startswith(prompt.prefix) and prompt.unconditional.startswith(prompt.prefix)
    generator = LocalGenerator(tiny_backend, ServingSettings(batch_window_ms=0))
    try:
        sampling = SamplingSettings(max_new_tokens=OPENING)  # each reply is its own opening: relevance is then
        # logprob minus the mean given the persona alone
        samples = await generator.sample(prompt.text, 5, sampling, prompt.stop, None, prefix=prompt.prefix,
                                         unconditional=prompt.unconditional)
        assert len(samples) == 5
        assert generator.stats()["prefix_hits"] >= 1  # the relevance pass took the persona from the prefix cache
        scored = [s for s in samples if s.logprob is not None]
        assert len(scored) >= 3
        # what a plain forward over the persona alone gives each reply (on the model's thread)
        plain = await asyncio.wrap_future(generator.call(
            lambda: tiny_backend.token_logprobs([(prompt.unconditional, s.text) for s in scored])))
        for sample, (ids, logprobs) in zip(scored, plain):
            assert ids and sample.relevance is not None
            assert sample.logprob < 0
            assert len(sample.features) == tiny_backend.model.config.hidden_size
            assert all(np.isfinite(sample.features))
            assert sample.logprob - sample.relevance == pytest.approx(float(np.mean(logprobs[:OPENING])), abs=5e-4)
        assert len({s.relevance for s in scored}) > 1

        without = await generator.sample(prompt.text, 3, sampling, prompt.stop, None, prefix=prompt.prefix)
        assert len(without) == 3
        assert all(s.logprob is None and s.relevance is None and s.features == () for s in without)
    finally:
        generator.close()


async def test_early_rejection_continues_the_best_rows_exactly_and_marks_the_rest_pruned(settings, tiny_backend):
    """Best-of-N with pruning: after the opening, only `keep` rows go on. Greedy sampling makes every row the
    same reply, so each continued row must be exactly the reply (text and signals) of one uninterrupted run."""
    prompt = haru_prompt(settings, tiny_backend)
    generator = LocalGenerator(tiny_backend, ServingSettings(batch_window_ms=0))
    greedy = SamplingSettings(top_k=1, max_new_tokens=2 * OPENING + 5, min_new_tokens=2 * OPENING + 5)
    rated: list[list[Sample]] = []

    def rate(samples: list[Sample]) -> list[float]:
        rated.append(samples)
        return [float(i) for i in range(len(samples))]  # later rows rate higher: the last `keep` go on

    try:
        whole = await generator.sample(prompt.text, 2, greedy, [], None, prompt.prefix, prompt.unconditional)
        cut = await generator.sample(prompt.text, 6, greedy, [], None, prompt.prefix, prompt.unconditional,
                                     pruning=Pruning(OPENING, 2, rate))
    finally:
        generator.close()
    assert whole[0].text == whole[1].text and whole[0].new_tokens == 2 * OPENING + 5 and not whole[0].pruned
    # the scorer saw the six openings with their signals, relevance included
    assert len(rated) == 1 and len(rated[0]) == 6
    assert all(s.new_tokens == OPENING and s.logprob is not None and s.relevance is not None for s in rated[0])
    assert [s.pruned for s in cut] == [True] * 4 + [False] * 2
    for kept in cut[4:]:  # continued from the cache, recorder and mask of the first call: the same reply
        assert kept.text == whole[0].text and kept.new_tokens == whole[0].new_tokens
        assert kept.logprob == pytest.approx(whole[0].logprob, abs=1e-3)
        assert kept.relevance == pytest.approx(whole[0].relevance, abs=1e-3)
        assert np.allclose(kept.features, whole[0].features, atol=1e-3)
    for dropped in cut[:4]:  # partial replies: their opening, with its signals
        assert dropped.new_tokens == OPENING and whole[0].text.startswith(dropped.text)
        assert dropped.logprob is not None


# -- the ranker -------------------------------------------------------------------------------------------

def synthetic_picks(rng, count: int, cfg: RankingSettings, dim: int) -> list[ranking.PickFeatures]:
    """Picks whose chosen reply is always higher on `dim` (by 1 to 2) and noise everywhere else."""
    size = ranking.SIGNALS + cfg.state_dims
    picks = []
    for _ in range(count):
        rejected = [rng.normal(size=size) for _ in range(2)]
        chosen = rng.normal(size=size)
        chosen[dim] = max(r[dim] for r in rejected) + rng.uniform(1, 2)
        picks.append(ranking.PickFeatures(chosen, rejected))
    return picks


def loss_gradient(w, picks, cfg):
    d = np.stack([p.chosen - r for p in picks for r in p.rejected])
    p = 1 / (1 + np.exp(d @ w))
    pull = np.array([cfg.l2] * ranking.SIGNALS + [cfg.state_l2] * cfg.state_dims)
    return -(d * p[:, None]).sum(axis=0) + pull * (w - ranking.prior(cfg))


def test_fit_learns_which_state_dimension_the_user_prefers():
    cfg = RankingSettings(state_dims=6, l2=0.5, state_l2=0.5)
    dim = ranking.SIGNALS + 3
    rng = np.random.default_rng(7)
    picks = synthetic_picks(rng, 10, cfg, dim)
    w = np.asarray(ranking.fit(picks, None, cfg))
    assert w.shape == (ranking.SIGNALS + cfg.state_dims,)
    assert w[dim] > 1.0
    assert np.abs(np.delete(w[ranking.SIGNALS:], 3)).max() < w[dim] / 2
    assert np.abs(loss_gradient(w, picks, cfg)).max() < 1e-3  # Newton settled on the minimum
    # starting from other weights (the previous fit) ends at the same minimum
    assert np.asarray(ranking.fit(picks, [0.0] * len(w), cfg)) == pytest.approx(w, abs=1e-4)

    # fresh replies: the one higher on that dimension scores higher, the learned way
    wins = 0
    for _ in range(50):
        a, b = rng.normal(size=len(w)), rng.normal(size=len(w))
        a[dim], b[dim] = b[dim] + 1.5, b[dim]
        wins += float(w @ a) > float(w @ b)
    assert wins >= 45


def test_fit_without_history_is_the_prior_and_the_pulls_hold_it():
    cfg = RankingSettings(state_dims=4, logprob_weight=1.0, relevance_weight=0.5)
    prior = ranking.prior(cfg)
    assert prior.tolist() == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert ranking.fit([], None, cfg) == prior.tolist()
    assert ranking.fit([], [9.0] * 6, cfg) == prior.tolist()
    wrong_size = ranking.PickFeatures(np.ones(3), [np.zeros(3)])  # state_dims changed since: left out
    assert ranking.fit([wrong_size], None, cfg) == prior.tolist()
    assert ranking.usable([1.0, 2.0], cfg).tolist() == prior.tolist()
    assert ranking.usable([float("nan")] * 6, cfg).tolist() == prior.tolist()

    picks = synthetic_picks(np.random.default_rng(1), 10, cfg, 0)  # they prefer a higher log-prob still
    distances = [np.linalg.norm((np.asarray(ranking.fit(picks, None, cfg.model_copy(update={"l2": l2}))) - prior)
                                [:ranking.SIGNALS]) for l2 in (0.1, 1.0, 10.0, 100.0)]
    assert all(a > b for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < distances[0] / 5
    # the state's own pull: a stronger one keeps the state weights nearer zero, the signals' pull aside
    picks = synthetic_picks(np.random.default_rng(1), 10, cfg, ranking.SIGNALS)  # they prefer a state direction
    state = [np.abs(np.asarray(ranking.fit(picks, None, cfg.model_copy(update={"state_l2": l2})))[ranking.SIGNALS:]).max()
             for l2 in (0.1, 1.0, 10.0)]
    assert state[0] > state[1] > state[2], state


def test_score_samples_ranks_by_the_weights_and_keeps_unscored_replies_last():
    cfg = RankingSettings(state_dims=8)
    rng = np.random.default_rng(5)
    replies = {f"reply {i}": Sample(f"reply {i}", 5, True, logprob=float(-rng.uniform(1, 5)),
                                    relevance=float(rng.normal()), features=tuple(rng.normal(size=32)))
               for i in range(6)}
    replies["no signals"] = Sample("no signals", 5, True)
    weights = rng.normal(size=ranking.SIGNALS + cfg.state_dims).tolist()
    for w in (None, weights):
        scored = ranking.score_samples(replies, w, cfg)
        assert [s.text for s in scored][-1] == "no signals" and scored[-1].score is None and scored[-1].state is None
        used = ranking.prior(cfg) if w is None else np.asarray(w)
        for item in scored[:-1]:
            assert item.state.dtype == np.float16 and item.state.shape == (cfg.state_dims,)
            x = ranking.features(item.sample.logprob, item.sample.relevance, item.state, cfg.state_dims)
            assert item.score == round(float(used @ x), 4)
        assert [s.score for s in scored[:-1]] == sorted((s.score for s in scored[:-1]), reverse=True)
    # the prior weighs log-prob and relevance alone (1 and 2 by default), never the state
    by_prior = [s.text for s in ranking.score_samples(replies, None, cfg)][:-1]
    assert by_prior == sorted(by_prior, key=lambda t: -(replies[t].logprob + 2 * replies[t].relevance))


# -- the engine: every sample stored, the best offered, the ranker learned after each pick ----------------

def vector(candidate: dict, cfg: RankingSettings) -> np.ndarray:
    state = np.frombuffer(candidate["state"], dtype=np.float16)
    assert state.shape == (cfg.state_dims,)
    return ranking.features(candidate["logprob"], candidate["relevance"], state, cfg.state_dims)


def check_scores(row: dict, weights: np.ndarray, cfg: RankingSettings) -> None:
    for c in row["candidates"] + row["unshown"]:
        assert c["logprob"] is not None and c["relevance"] is not None and c["state"] is not None
        assert c["score"] == round(float(weights @ vector(c, cfg)), 4)


async def offer_with_siblings(engine, text: str, user=ALICE):
    offer = await engine.on_message(user, text)
    assert len(offer.texts) >= 2 and not offer.auto_picked, "eight samples of 12 random tokens should differ"
    return offer


@pytest.fixture
def ranked_settings(settings):
    settings.sampling.samples = 8
    settings.sampling.candidates = 3
    settings.ranking.continue_best = 0  # every sample whole (pruning: its own test below)
    return settings


async def test_every_sample_is_stored_ranked_and_the_next_offer_uses_the_learned_ranker(engine, store,
                                                                                        ranked_settings):
    cfg = ranked_settings.ranking
    offer = await offer_with_siblings(engine, "배고파. 저녁 뭐 먹지?")
    assert len(offer.texts) <= 3
    assert engine.generator.rows == 8  # one batched call for all samples
    row = store.candidate_set(offer.id)
    shown, unshown = row["candidates"], row["unshown"]
    assert [c["text"] for c in shown] == offer.texts
    assert unshown and len(shown) + len(unshown) <= 8
    assert all(c["shown"] for c in shown) and not any(c["shown"] for c in unshown)
    assert [c["idx"] for c in shown + unshown] == list(range(len(shown) + len(unshown)))
    assert sorted(c["ranked"] for c in shown + unshown) == list(range(len(shown) + len(unshown)))
    assert max(c["ranked"] for c in shown) < min(c["ranked"] for c in unshown)
    assert len({c["text"] for c in shown + unshown}) == len(shown) + len(unshown)
    by_rank = sorted(shown + unshown, key=lambda c: c["ranked"])
    assert [c["score"] for c in by_rank] == sorted((c["score"] for c in by_rank), reverse=True)
    assert store.ranker(ALICE.id) is None
    check_scores(row, ranking.prior(cfg), cfg)  # a new user: the prior

    await engine.on_pick(ALICE, offer.id, 1)
    weights = store.ranker(ALICE.id)
    assert weights is not None and len(weights) == ranking.SIGNALS + cfg.state_dims
    assert weights != ranking.prior(cfg).tolist()
    history = ranking.pick_features(store.ranking_history(ALICE.id, cfg.history_picks), cfg)
    assert len(history) == 1 and len(history[0].rejected) == len(shown) - 1  # the shown siblings only
    assert weights == ranking.fit(history, None, cfg)
    records = list(store.preference_records(ALICE.id))
    assert len(records) == 1
    assert records[0]["chosen"] == offer.texts[1]
    assert records[0]["rejected"] == offer.texts[:1] + offer.texts[2:]
    assert records[0]["unshown"] == [c["text"] for c in unshown]

    following = await offer_with_siblings(engine, "라면 어때?")
    row = store.candidate_set(following.id)
    check_scores(row, np.asarray(weights), cfg)
    prior_scores = [round(float(ranking.prior(cfg) @ vector(c, cfg)), 4) for c in row["candidates"] + row["unshown"]]
    assert prior_scores != [c["score"] for c in row["candidates"] + row["unshown"]]

    await engine.on_pick(ALICE, following.id, 0)  # a second pick refits from the first fit's weights
    second = store.ranker(ALICE.id)
    history = ranking.pick_features(store.ranking_history(ALICE.id, cfg.history_picks), cfg)
    assert len(history) == 2 and second != weights
    assert np.asarray(second) == pytest.approx(np.asarray(ranking.fit(history, None, cfg)), abs=1e-4)


async def test_opting_out_drops_the_ranker_opting_in_refits_and_forget_deletes_it(engine, store, ranked_settings):
    cfg = ranked_settings.ranking
    first = await offer_with_siblings(engine, "주말에 뭐 해?")
    await engine.on_pick(ALICE, first.id, 0)
    assert store.ranker(ALICE.id) is not None

    await engine.set_learning(ALICE, False)
    assert store.ranker(ALICE.id) is None and not engine.learning_enabled(ALICE)
    while_out = await offer_with_siblings(engine, "강아지 산책 가자!")
    check_scores(store.candidate_set(while_out.id), ranking.prior(cfg), cfg)
    await engine.on_pick(ALICE, while_out.id, 1)
    assert store.ranker(ALICE.id) is None  # a pick while opted out teaches no ranking
    assert list(store.preference_records(ALICE.id)) == []

    await engine.set_learning(ALICE, True)
    weights = store.ranker(ALICE.id)
    assert weights is not None  # refit from the stored picks, both of them
    history = ranking.pick_features(store.ranking_history(ALICE.id, cfg.history_picks), cfg)
    assert len(history) == 2
    assert np.asarray(weights) == pytest.approx(np.asarray(ranking.fit(history, None, cfg)), abs=1e-6)
    back = await offer_with_siblings(engine, "좋아, 가자")
    check_scores(store.candidate_set(back.id), np.asarray(weights), cfg)

    exported = store.export_user(ALICE.id)
    assert exported["ranker"]["weights"] == weights and exported["ranker"]["picks"] == 2
    sets = [s for conversation in exported["conversations"] for s in conversation["candidate_sets"]]
    assert [s["id"] for s in sets] == [first.id, while_out.id, back.id]
    for s in sets:
        row = store.candidate_set(s["id"])
        assert s["candidates"] == [c["text"] for c in row["candidates"]]
        assert s["not_shown"] == [c["text"] for c in row["unshown"]] and s["not_shown"]

    await engine.forget(ALICE)
    assert store.ranker(ALICE.id) is None
    assert store.db.execute("SELECT COUNT(*) FROM rankers WHERE user_id = ?", [ALICE.id]).fetchone()[0] == 0
    assert store.db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0] == 0
    assert store.export_user(ALICE.id)["user"] is None


async def test_without_ranking_only_the_offered_number_is_sampled_and_nothing_is_scored(engine, store,
                                                                                        ranked_settings):
    ranked_settings.ranking.enabled = False
    offer = await offer_with_siblings(engine, "심심해")
    assert engine.generator.rows == ranked_settings.sampling.candidates
    row = store.candidate_set(offer.id)
    assert [c["text"] for c in row["candidates"]] == offer.texts and row["unshown"] == []
    for c in row["candidates"]:
        assert c["shown"] and c["score"] is None and c["ranked"] is None
        assert c["logprob"] is None and c["relevance"] is None and c["state"] is None
    await engine.on_pick(ALICE, offer.id, 0)
    assert store.ranker(ALICE.id) is None
    assert list(store.preference_records(ALICE.id))[0]["unshown"] == []


async def test_offers_prune_after_the_opening_and_never_show_a_partial_reply(engine, store, ranked_settings):
    ranked_settings.sampling.max_new_tokens = 2 * OPENING
    ranked_settings.ranking.continue_best = 4
    offer = await offer_with_siblings(engine, "배고파. 저녁 뭐 먹지?")
    row = store.candidate_set(offer.id)
    shown, unshown = row["candidates"], row["unshown"]
    assert [c["text"] for c in shown] == offer.texts and not any(c["pruned"] for c in shown)
    pruned = [c for c in unshown if c["pruned"]]
    whole = [c for c in shown + unshown if not c["pruned"]]
    assert pruned, "a random model rarely ends a reply within its opening: some rows were dropped"
    assert len(whole) <= 4 + sum(c["new_tokens"] < OPENING for c in whole)  # 4 went on, besides early ends
    assert all(c["new_tokens"] == OPENING and not c["hit_stop"] for c in pruned)
    assert all(c["logprob"] is not None and c["score"] is not None for c in pruned)
    await engine.on_pick(ALICE, offer.id, 0)
    [record] = list(store.preference_records(ALICE.id))
    assert not set(record["unshown"]) & {c["text"] for c in pruned}  # partial replies are no one's choice
    export = store.export_user(ALICE.id)
    [exported] = [s for c in export["conversations"] for s in c["candidate_sets"] if s["id"] == offer.id]
    assert exported["pruned"] == [c["text"] for c in pruned]
