"""The dialogue engine end to end on the tiny random model and a real SQLite file."""

import asyncio

import pytest

from bot.engine import DialogueEngine, EngineError, UserRef
from bot.prompt import Turn, one_line

ALICE = UserRef("test", "alice", "Alice")
BOB = UserRef("test", "bob", "Bob")


async def test_message_offers_distinct_candidates_and_stores_everything(engine, store):
    offer = await engine.on_message(ALICE, "안녕! 오늘 너무 피곤했어")
    assert offer.opening  # first message: the persona's greeting comes first
    assert 1 <= len(offer.texts) <= 3
    assert all(t.strip() == t and t for t in offer.texts)
    assert len(set(offer.texts)) == len(offer.texts)
    row = store.candidate_set(offer.id)
    assert row["status"] == "open" and row["user_id"] == ALICE.id
    assert [c["text"] for c in row["candidates"]] == offer.texts
    assert row["prompt"].endswith("하루:")
    assert row["generation"] == "base" and row["model"] == engine.tokenizer.name
    assert '"temperature"' in row["sampling_json"] and row["candidates"][0]["sampling_json"] == row["sampling_json"]


async def test_pick_continues_with_the_picked_reply_only(engine, store):
    offer = await engine.on_message(ALICE, "배고파")
    if offer.auto_picked:
        pytest.skip("the tiny model gave one distinct reply")
    picked = await engine.on_pick(ALICE, offer.id, 1)
    assert picked.text == offer.texts[1] and not picked.already
    turns = store.turns(store.active_conversation(ALICE.id)["id"])
    assert [(t["role"], t["source"]) for t in turns] == [("char", "greeting"), ("user", "typed"), ("char", "picked")]
    assert turns[-1]["text"] == offer.texts[1]
    following = await engine.on_message(ALICE, "라면 어때?")
    prompt = store.candidate_set(following.id)["prompt"]
    assert f"하루: {one_line(offer.texts[1])}\n" in prompt  # transcripts keep one line per turn
    for rejected in offer.texts[:1] + offer.texts[2:]:
        assert f"하루: {one_line(rejected)}\n" not in prompt


async def test_pick_errors_are_clear_and_change_nothing(engine, store):
    offer = await engine.on_message(ALICE, "주말에 뭐 해?")
    assert not offer.auto_picked, "three samples of 12 random tokens should differ"
    with pytest.raises(EngineError) as err:
        await engine.on_pick(ALICE, offer.id, 7)
    assert err.value.key == "pick_out_of_range" and err.value.params == {"count": len(offer.texts)}
    with pytest.raises(EngineError, match="pick_unknown"):
        await engine.on_pick(BOB, offer.id, 0)  # someone else's set
    with pytest.raises(EngineError, match="pick_unknown"):
        await engine.on_pick(ALICE, "feedfacecafe", 0)
    assert store.stats()["picks"] == 0

    await engine.on_pick(ALICE, offer.id, 0)
    again = await engine.on_pick(ALICE, offer.id, 0)  # double click: same answer, nothing new stored
    assert again.already and again.text == offer.texts[0]
    with pytest.raises(EngineError) as err:
        await engine.on_pick(ALICE, offer.id, 1)
    assert err.value.key == "pick_already" and err.value.params == {"index": 1}
    assert store.stats()["picks"] == 1

    old = await engine.on_message(ALICE, "강아지 산책 가자")
    await engine.on_message(ALICE, "아니다, 그냥 쉬자")  # a new message skips the old offer
    with pytest.raises(EngineError, match="pick_stale"):
        await engine.on_pick(ALICE, old.id, 0)
    assert store.candidate_set(old.id)["status"] == "skipped"


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\x00"])
async def test_empty_messages_are_refused_and_store_nothing(engine, store, text):
    with pytest.raises(EngineError, match="empty_message"):
        await engine.on_message(ALICE, text)
    assert store.stats()["turns"] == 0


async def test_huge_message_is_shortened_in_the_prompt_but_stored_whole(engine, store, settings):
    huge = "가나다라 " * 25_000  # 125,000 characters
    offer = await engine.on_message(ALICE, huge)
    notice = next(n for n in offer.notices if n.key == "message_shortened")
    assert notice.params == {"length": len(huge.strip()), "limit": settings.chat.max_message_chars}
    turns = store.turns(store.active_conversation(ALICE.id)["id"])
    assert turns[-1]["text"] == huge.strip()
    row = store.candidate_set(offer.id)
    assert row["prompt_tokens"] <= settings.chat.max_context_tokens
    assert len(row["prompt"]) < 10_000


async def test_duplicates_are_dropped_and_a_single_reply_is_taken_directly(engine, store):
    engine.settings.sampling.top_k = 1  # greedy: every sample is the same
    offer = await engine.on_message(ALICE, "안녕")
    assert len(offer.texts) == 1 and offer.auto_picked
    assert [n.key for n in offer.notices] == ["fewer_candidates"]
    assert store.candidate_set(offer.id)["status"] == "picked"
    assert list(store.preference_records()) == []  # nothing was chosen over anything


async def test_regenerate_offers_new_candidates_for_the_same_message(engine, store):
    with pytest.raises(EngineError, match="nothing_to_regenerate"):
        await engine.regenerate(ALICE)
    first = await engine.on_message(ALICE, "심심해")
    second = await engine.regenerate(ALICE)
    assert second.id != first.id
    assert store.candidate_set(first.id)["status"] == "regenerated"
    assert store.candidate_set(second.id)["user_turn_id"] == store.candidate_set(first.id)["user_turn_id"]
    with pytest.raises(EngineError, match="pick_stale"):
        await engine.on_pick(ALICE, first.id, 0)
    await engine.on_pick(ALICE, second.id, 0)
    with pytest.raises(EngineError, match="nothing_to_regenerate"):
        await engine.regenerate(ALICE)


async def test_reset_and_persona_switch_start_new_conversations(engine, store):
    opening = await engine.open(ALICE)
    assert opening.greeting in engine.personas.get("haru").greetings
    assert (await engine.open(ALICE)).greeting is None  # already talking
    first = store.active_conversation(ALICE.id)["id"]
    offer = await engine.on_message(ALICE, "안녕")
    await engine.reset(ALICE)
    assert store.active_conversation(ALICE.id)["id"] != first
    assert store.candidate_set(offer.id)["status"] == "reset"
    assert len(store.turns(first)) == 2  # the old conversation is kept

    assert engine.language_of(ALICE) == "ko"
    opening = await engine.set_persona(ALICE, "sam")
    assert opening.persona_name == "Sam" and engine.language_of(ALICE) == "en"
    with pytest.raises(EngineError) as err:
        await engine.set_persona(ALICE, "nobody")
    assert err.value.key == "persona_unknown" and "haru" in err.value.params["personas"]


async def test_picks_become_preference_records_without_guessing(engine, store):
    offer = await engine.on_message(ALICE, "저녁 뭐 먹지?")
    await engine.on_pick(ALICE, offer.id, 2 if len(offer.texts) == 3 else 0)
    [record] = store.preference_records()
    chosen = offer.texts[2 if len(offer.texts) == 3 else 0]
    assert record["chosen"] == chosen
    assert sorted(record["rejected"]) == sorted(t for t in offer.texts if t != chosen)
    assert record["prompt"] == store.candidate_set(offer.id)["prompt"]
    assert record["context"][-1] == {"role": "user", "content": "저녁 뭐 먹지?"}
    store.update_user(ALICE.id, learning_opt_out=1)
    assert list(store.preference_records()) == []


async def test_one_users_generation_does_not_block_another_users_pick(engine, store):
    bob_offer = await engine.on_message(BOB, "안녕")
    engine.generator.backend.lock.acquire()  # the model is busy: Alice's sampling has to wait
    try:
        alice = asyncio.create_task(engine.on_message(ALICE, "안녕"))
        await asyncio.sleep(0.05)
        picked = await asyncio.wait_for(engine.on_pick(BOB, bob_offer.id, 0), timeout=5)
        assert picked.text == bob_offer.texts[0]
        assert not alice.done()
    finally:
        engine.generator.backend.lock.release()
    assert (await alice).texts


async def test_requests_of_one_user_are_serialised(engine, store):
    results = await asyncio.gather(*(engine.on_message(ALICE, f"메시지 {i}") for i in range(4)))
    sets = [store.candidate_set(r.id) for r in results]
    assert [s["status"] for s in sets] == ["skipped", "skipped", "skipped", "open"]
    turns = store.turns(store.active_conversation(ALICE.id)["id"])
    assert [t["text"] for t in turns if t["role"] == "user"] == [f"메시지 {i}" for i in range(4)]
    # each set answers its own message, and saw the messages before it
    for i, s in enumerate(sets):
        assert f"메시지 {i}\n하루:" in s["prompt"]


async def test_state_survives_a_restart(settings, tiny_backend):
    from bot.store import Store
    from persona import PersonaLibrary

    first = DialogueEngine(Store(settings.storage.db_path), tiny_backend, PersonaLibrary(), settings)
    offer = await first.on_message(ALICE, "기억해 줘")
    first.store.close()
    second = DialogueEngine(Store(settings.storage.db_path), tiny_backend, PersonaLibrary(), settings)
    picked = await second.on_pick(ALICE, offer.id, 0)
    assert picked.text == offer.texts[0]
    second.store.close()


async def test_a_vanished_or_broken_persona_file_falls_back_to_the_default(engine, store, settings):
    from persona import dump_card

    card = engine.personas.get("sam")
    card_copy = type(card)(**{**card.__dict__, "key": "mine", "name": "Mina"})
    path = engine.personas.save(card_copy)
    opening = await engine.set_persona(ALICE, "mine")
    assert opening.persona_name == "Mina"
    path.write_text("name = \n")  # corrupt
    offer = await engine.on_message(ALICE, "hello?")
    assert offer.texts and store.candidate_set(offer.id)["persona"] == "haru"
    path.unlink()  # gone
    assert (await engine.on_message(ALICE, "still there?")).texts
    assert store.user(ALICE.id)["persona"] == "mine"  # the user's choice is kept for when the file returns
    assert dump_card(card)  # the built-in card itself is untouched


async def test_a_user_sending_too_fast_is_asked_to_slow_down_and_nothing_is_stored(engine, store, settings):
    settings.chat.messages_per_minute = 2
    await engine.on_message(ALICE, "하나")
    await engine.on_message(ALICE, "둘")
    with pytest.raises(EngineError) as refused:
        await engine.on_message(ALICE, "셋")
    assert refused.value.key == "slow_down" and 1 <= refused.value.params["seconds"] <= 60
    turns = store.turns(store.active_conversation(ALICE.id)["id"])
    assert [t["text"] for t in turns if t["role"] == "user"] == ["하나", "둘"]
    assert (await engine.on_message(BOB, "나는 괜찮지?")).texts  # others are not affected


async def test_a_full_model_queue_answers_busy_instead_of_waiting_forever(engine, store, settings):
    settings.serving.max_queue = 1
    engine.generator.backend.lock.acquire()  # the model is stuck on a long batch
    try:
        alice = asyncio.create_task(engine.on_message(ALICE, "안녕"))
        for _ in range(100):
            if engine.generator.pending():
                break
            await asyncio.sleep(0.01)
        with pytest.raises(EngineError) as refused:
            await engine.on_message(BOB, "나도 안녕")
        assert refused.value.key == "busy" and store.user(BOB.id) is None  # refused before anything is stored
    finally:
        engine.generator.backend.lock.release()
    assert (await alice).texts
    assert (await engine.on_message(BOB, "이제 돼?")).texts


async def test_opting_out_of_learning_keeps_chatting_and_keeps_picks_out_of_training(engine, store):
    offer = await engine.on_message(ALICE, "안녕")
    await engine.on_pick(ALICE, offer.id, 0)
    assert engine.learning_enabled(ALICE) and len(list(store.preference_records(ALICE.id))) == 1
    await engine.set_learning(ALICE, False)
    assert not engine.learning_enabled(ALICE) and list(store.preference_records(ALICE.id)) == []
    offer = await engine.on_message(ALICE, "계속 얘기하자")  # chatting goes on
    await engine.on_pick(ALICE, offer.id, 0)
    assert store.stats()["picks"] == 2 and list(store.preference_records()) == []
    await engine.set_learning(ALICE, True)
    assert len(list(store.preference_records(ALICE.id))) == 2


async def test_typed_control_tokens_stay_text_in_prompts_and_training(engine, tiny_backend, settings):
    from dataclasses import replace

    from bot.prompt import build_prompt
    from training.train import _rows

    tokenizer = tiny_backend.tokenizer
    specials = set(tokenizer.all_special_ids)
    assert tokenizer("<eos>", add_special_tokens=False).input_ids == [tokenizer.eos_token_id]  # parsed if not defused
    offer = await engine.on_message(ALICE, "안녕 <eos><bos> 하루: <pad> 끝")
    prompt = engine.store.candidate_set(offer.id)["prompt"]
    assert "<\u2060eos>" in prompt and not specials & set(tokenizer(prompt, add_special_tokens=False).input_ids)

    card = replace(engine.personas.get("haru"), description="착한 친구 <eos> 끝", name="하루<bos>")
    carded = build_prompt(card, [Turn("user", "안녕")], count_tokens=tiny_backend.count_tokens, budget=10_000,
                          special_tokens=tiny_backend.special_tokens)
    assert not specials & set(tokenizer(carded.text, add_special_tokens=False).input_ids)

    [row] = _rows([{"prompt": "나: <eos>\n하루:", "chosen": "응 <eos>", "rejected": "아니", "context": []}],
                  tiny_backend, settings.training, 12)
    for text in (row["prompt"], row["chosen"]):
        assert not specials & set(tokenizer(text, add_special_tokens=False).input_ids), text


async def test_resets_and_persona_switches_are_rate_limited_too(engine, settings):
    settings.chat.messages_per_minute = 2
    await engine.reset(ALICE)
    await engine.set_persona(ALICE, "sam")
    for flood in (engine.reset(ALICE), engine.set_persona(ALICE, "haru")):
        with pytest.raises(EngineError) as refused:
            await flood
        assert refused.value.key == "slow_down"
    assert engine.store.db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 2  # nothing more stored


async def test_per_user_bookkeeping_does_not_grow_with_every_user_ever(engine, store, settings):
    import time

    await asyncio.gather(*(engine.on_message(UserRef("console", str(i)), "안녕") for i in range(30)))
    assert len(engine._user_locks) == 0  # nobody holds or waits: no lock kept
    assert len(engine._recent) == 30
    engine._recent_pruned -= 61  # a minute later, one more message prunes the quiet users' rate windows
    for times in engine._recent.values():
        times[-1] -= 61
    await engine.on_message(UserRef("console", "late"), "안녕")
    assert list(engine._recent) == ["console:late"]
    assert time.monotonic() - engine._recent["console:late"][-1] < 60


async def test_the_bots_language_follows_the_app_then_memory_then_the_persona(engine, store, settings):
    korean_app, english_app = UserRef("telegram", "1", locale="ko"), UserRef("telegram", "1", locale="en-GB")
    no_locale = UserRef("telegram", "1")
    assert engine.language_of(no_locale) == "ko"  # 하루's language
    assert engine.language_of(english_app) == "en" and engine.language_hint(english_app).params["suggestion"] == "sam"
    await engine.open(english_app)
    assert engine.language_of(no_locale) == "en"  # remembered for events without a locale
    assert engine.language_of(korean_app) == "ko" and engine.language_hint(korean_app) is None
    offer = await engine.on_message(UserRef("telegram", "2", locale="en"), "hi")
    assert offer.opening and offer.notices[0].key == "persona_language_hint"  # a first conversation says so
    settings.chat.language = "ko"  # an operator's choice wins
    assert engine.language_of(english_app) == "ko"
