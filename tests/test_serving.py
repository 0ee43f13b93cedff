"""Serving many users' adapters at once: mixed batches, the adapter cache, isolation, fallbacks."""

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from bot.config import ModelSettings, SamplingSettings, ServingSettings
from bot.engine import UserRef
from bot.model import ModelBackend, ModelError
from bot.serving import AdapterError, AdapterRef, LocalGenerator
from bot.serving.multi_lora import read_adapter
from bot.serving.slots import AdapterCache

GREEDY = SamplingSettings(top_k=1, max_new_tokens=8, repetition_penalty=1.0)


def make_adapter(model_dir: Path, out: Path, seed: int, rank: int = 8) -> Path:
    """A peft LoRA folder with random (non-zero) A and B, so its outputs differ from the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    return [AdapterRef(f"user-u{i}-gen-1", make_adapter(tiny_model_dir, root / f"u{i}", seed=i)) for i in range(5)]


def load_backend(model_dir) -> ModelBackend:
    return ModelBackend.load(ModelSettings(name=str(model_dir), dtype="float32", prompt_format="transcript"))


@pytest.fixture
def generator(tiny_model_dir):
    g = LocalGenerator(load_backend(tiny_model_dir), ServingSettings(max_adapters=4, batch_window_ms=30))
    yield g
    g.close()


def peft_logits(model_dir, adapters: list[AdapterRef], ids: torch.Tensor) -> dict[int | None, torch.Tensor]:
    """Float32 logits of one prompt from peft, for each adapter by index and for the base (None)."""
    reference = load_backend(model_dir)
    expected = {}
    for i, ref in enumerate(adapters):
        reference.load_adapter(ref.name, ref.path)
        with torch.no_grad(), reference._use_adapter(ref.name):
            expected[i] = reference.model(ids).logits[0]
    with torch.no_grad(), reference._use_adapter(None):
        expected[None] = reference.model(ids).logits[0]
    return expected


def mixed_batch_logits(generator: LocalGenerator, adapters: list[AdapterRef], ids: torch.Tensor,
                       layout: list[int | None]) -> tuple[torch.Tensor, int]:
    """Logits of `ids` repeated once per entry of `layout` (an adapter's index, or None for the base),
    each row on its own adapter in one forward pass; and how many row groups the batch was split into."""
    slots = [generator.cache.acquire(ref) for ref in adapters]
    model = generator.backend.model
    generator._route([-1 if i is None else slots[i] for i in layout])
    groups = 1 if generator.router.plan.groups is None else len(generator.router.plan.groups)
    try:
        with torch.no_grad():
            return model(ids.repeat(len(layout), 1)).logits.float(), groups
    finally:
        generator.router.clear()


@pytest.mark.parametrize("layout, groups", [
    ([0, 1, None], 3),                   # one row per request
    ([0, 0, 1, 1, None, None], 3),       # two candidates per request: each pair reads its adapter once
    ([0, 0, 0, 1, None, None], 6),       # runs of 3, 1 and 2 rows: no common group, row by row
])
def test_a_mixed_batch_matches_peft_one_adapter_at_a_time(tiny_model_dir, adapters, generator, layout, groups):
    ids = generator.backend.tokenizer("나: 안녕\n하루:", return_tensors="pt").input_ids
    expected = peft_logits(tiny_model_dir, adapters[:2], ids)
    logits, planned = mixed_batch_logits(generator, adapters[:2], ids, layout)
    assert planned == groups
    for row, i in zip(logits, layout):
        torch.testing.assert_close(row, expected[i], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(expected[0], expected[1]) and not torch.allclose(expected[0], expected[None])


@pytest.mark.parametrize("layout", [[0, 1, None], [1, 1]])  # a mixed batch; one adapter alone
def test_adapters_of_lower_ranks_are_served_at_their_rank(tiny_model_dir, adapters, generator, tmp_path, layout):
    # ranks 4 and 8 in banks of rank 16: the batch reads the first 8 columns, the rank-4 adapter's
    # columns 4..7 are zeros
    low = AdapterRef("user-low-gen-1", make_adapter(tiny_model_dir, tmp_path / "low", seed=7, rank=4))
    pair = [low, adapters[0]]
    ids = generator.backend.tokenizer("나: 안녕\n하루:", return_tensors="pt").input_ids
    expected = peft_logits(tiny_model_dir, pair, ids)
    logits, _ = mixed_batch_logits(generator, pair, ids, layout)
    assert generator.router.plan is None and generator.serving.max_rank == 16
    assert generator.cache.rank_of([generator.cache.slot_of[r.name] for r in pair] + [-1]) == 8
    assert generator.cache.rank_of([generator.cache.slot_of[low.name]]) == 4
    if len(set(layout)) > 1:  # the mixed batch gathered 8 of the 16 columns
        layer = next(iter(generator.cache.layers.values()))
        assert layer._a.shape[-1] == 8 and layer._b.shape[1] == 8
    for row, i in zip(logits, layout):
        torch.testing.assert_close(row, expected[i], atol=2e-4, rtol=1e-4)


def test_a_bfloat16_mixed_batch_follows_each_rows_adapter(tiny_model_dir, adapters):
    # bfloat16 weights, float32 slot banks: the update is cast into each row's bfloat16 output
    backend = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="bfloat16", prompt_format="transcript"))
    generator = LocalGenerator(backend, ServingSettings(max_adapters=2))
    try:
        ids = backend.tokenizer("나: 안녕\n하루:", return_tensors="pt").input_ids
        expected = peft_logits(tiny_model_dir, adapters[:2], ids)
        layout = [0, 0, 1, 1, None, None]
        logits, _ = mixed_batch_logits(generator, adapters[:2], ids, layout)
        for row, i in zip(logits, layout):
            distances = {j: (row - want).norm() / want.norm() for j, want in expected.items()}
            assert min(distances, key=distances.get) == i, distances
            assert distances[i] < 0.05  # bfloat16 rounding, not another adapter's weights
    finally:
        generator.close()


def test_the_model_is_loaded_and_served_on_the_worker_thread(tiny_model_dir):
    loaded_on = []

    def load() -> ModelBackend:
        loaded_on.append(threading.current_thread().name)
        return load_backend(tiny_model_dir)

    generator = LocalGenerator(load, ServingSettings())
    try:
        assert loaded_on == ["banryeo-model"] and generator.backend.model is not None
        [sample] = generator.submit("나: 안녕\n하루:", 1, GREEDY, [], None).result(timeout=60)
        assert sample.text
        assert generator.call(lambda: threading.current_thread().name).result(timeout=30) == "banryeo-model"
        with pytest.raises(ZeroDivisionError):  # other work on the model's thread; its errors come back
            generator.call(lambda: 1 / 0).result(timeout=30)
    finally:
        generator.close()
    with pytest.raises(ModelError, match="does not exist"):  # a load error reaches the caller
        LocalGenerator.load(ModelSettings(name="/no/such/model"), ServingSettings())


async def test_concurrent_users_never_get_each_others_adapter(adapters, generator):
    prompt = "나: 오늘 뭐 했어?\n하루:"
    solo = {}
    for ref in [*adapters, None]:  # each user alone: what their own weights say (greedy)
        [sample] = await generator.sample(prompt, 1, GREEDY, [], ref)
        solo[ref.name if ref else "base"] = sample.text
    assert len(set(solo.values())) == len(solo), solo  # the adapters are distinguishable

    batches_before = generator.batches
    jobs = [(ref, generator.sample(prompt, 2, GREEDY, [], ref)) for _ in range(4) for ref in [*adapters, None]]
    results = await asyncio.gather(*(job for _, job in jobs))
    for (ref, _), samples in zip(jobs, results):
        assert [s.text for s in samples] == [solo[ref.name if ref else "base"]] * 2
    assert generator.batches - batches_before < len(jobs)  # requests of different users shared batches
    assert generator.stats()["evictions"] >= 1  # five adapters, four slots: the cache cycled under load


async def test_shared_prefill_samples_what_plain_generate_samples(tiny_model_dir, generator):
    reference = load_backend(tiny_model_dir)
    for prompt in ("나: 안녕\n하루:", "나: 오늘 좀 길게 얘기해도 돼? 할 말이 많아\n하루: 응\n나: 고마워\n하루:", "안"):
        ids = reference.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = reference.model.generate(**ids, do_sample=False, max_new_tokens=8, repetition_penalty=1.0,
                                           pad_token_id=reference.tokenizer.pad_token_id)
        expected = reference.tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        samples = await generator.sample(prompt, 2, GREEDY, [], None)
        assert [s.text for s in samples] == [expected, expected]


def test_the_cache_evicts_least_recently_used_but_never_one_in_use(tiny_model_dir, adapters):
    backend = load_backend(tiny_model_dir)
    generator = LocalGenerator(backend, ServingSettings(max_adapters=2))
    cache: AdapterCache = generator.cache
    try:
        a, b, c = adapters[:3]
        slot_a = cache.acquire(a)
        cache.acquire(b)
        assert not cache.can_take({c.name})  # both slots serve requests right now
        cache.release(b.name)
        assert cache.can_take({c.name})
        assert cache.acquire(c) != slot_a  # b was free, a is still in use
        assert set(cache.slot_of) == {a.name, c.name} and cache.evictions == 1
        cache.release(a.name)
        cache.release(c.name)
        cache.acquire(b)  # now a is the least recently used
        assert set(cache.slot_of) == {c.name, b.name}
    finally:
        generator.close()


def test_a_promoted_generation_loads_beside_the_old_one_until_its_replies_finish(tiny_model_dir, adapters):
    generator = LocalGenerator(load_backend(tiny_model_dir), ServingSettings(max_adapters=4))
    cache = generator.cache
    try:
        old = AdapterRef("user-alice-gen-1", adapters[0].path)
        new = AdapterRef("user-alice-gen-2", adapters[1].path)
        cache.acquire(old)  # a reply in flight on gen-1
        cache.acquire(new)
        assert {old.name, new.name} <= set(cache.slot_of)
        cache.release(old.name)  # its last reply is done: gen-1's slot is freed right away
        assert old.name not in cache.slot_of and new.name in cache.slot_of
    finally:
        generator.close()


def test_unservable_adapters_are_refused_clearly(tiny_model_dir, adapters, tmp_path):
    modules = {f"model.layers.{i}.{part}" for i in range(2) for part in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert len(read_adapter(adapters[0].path, 16, modules)) == len(modules)
    with pytest.raises(AdapterError, match="missing"):
        read_adapter(tmp_path / "nothing", 16, modules)
    with pytest.raises(AdapterError, match="rank 8 is above"):
        read_adapter(adapters[0].path, 4, modules)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters[0].path / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="cannot be read"):
        read_adapter(broken, 16, modules)


async def test_a_broken_generation_falls_back_to_its_parent_with_an_admin_visible_error(engine, adapters, tmp_path):
    from bot.admin import Admin

    alice = UserRef("test", "alice")
    await engine.on_message(alice, "안녕")
    good = engine.store.add_generation(alice.id, 1, str(adapters[0].path), None, "promoted", {}, 0)
    broken = engine.store.add_generation(alice.id, 2, str(tmp_path / "gone"), good, "promoted", {}, 0)
    engine.store.set_serving(alice.id, broken)
    offer = await engine.on_message(alice, "아직 있어?")
    assert offer.generation == "user-test-alice-gen-1" and offer.texts  # the previous generation answers
    errors = Admin(engine.store, engine.settings).status()["adapter_errors"]
    assert "missing" in errors["user-test-alice-gen-2"]
    assert (await engine.on_message(alice, "또?")).generation == "user-test-alice-gen-1"  # no retry storm
    engine.store.set_serving(alice.id, engine.store.add_generation(alice.id, 3, str(tmp_path / "also-gone"),
                                                                   None, "promoted", {}, 0))
    assert (await engine.on_message(alice, "이번엔?")).generation == "base"  # no parent left: the base model


async def test_int8_weights_serve_adapters_too(tiny_model_dir, adapters):
    backend = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="int8", prompt_format="transcript"))
    assert any(type(m).__name__ == "Linear" and "quantized" in type(m).__module__ for m in backend.model.modules())
    generator = LocalGenerator(backend, ServingSettings(max_adapters=2))
    try:
        prompt = "나: 안녕\n하루:"
        base, own, other = [await generator.sample(prompt, 1, GREEDY, [], ref) for ref in (None, *adapters[:2])]
        assert len({base[0].text, own[0].text, other[0].text}) == 3  # each adapter still changes the reply
        [again] = await generator.sample(prompt, 1, GREEDY, [], adapters[0])
        assert again.text == own[0].text
    finally:
        generator.close()


def logits_on(generator: LocalGenerator, ids: torch.Tensor, row_slots: list[int] | None) -> torch.Tensor:
    """One forward pass with each row on its slot (None: the plain base model)."""
    model = generator.backend.model
    try:
        if row_slots is not None:
            generator._route(row_slots)
        with torch.no_grad():
            return model(ids).logits
    finally:
        generator.router.clear()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_merged_adapter_answers_like_its_slot(tiny_model_dir, adapters, dtype):
    backend = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype=dtype, prompt_format="transcript"))
    generator = LocalGenerator(backend, ServingSettings(max_adapters=2, merged_adapters=1))
    try:
        ids = backend.tokenizer("나: 안녕\n하루:", return_tensors="pt").input_ids.repeat(2, 1)
        slot = generator.cache.acquire(adapters[0])
        base, unmerged = logits_on(generator, ids, None), logits_on(generator, ids, [slot, slot])
        generator.cache.merge(adapters[0].name)
        merged = logits_on(generator, ids, [slot, slot])
        generator._route([slot, slot])
        assert generator.router.plan.merged == slot  # the merged layers did the work
        generator._route([slot, -1])
        assert generator.router.plan.merged is None  # a row on the base model: back to the slot bank
        generator.router.clear()
        if dtype == "float32":  # (int8 quantises activations per batch, so rows nudge each other's rounding)
            torch.testing.assert_close(logits_on(generator, ids, [slot, -1])[1], base[1])
        effect = (unmerged - base).norm()
        assert effect > 1  # the adapter changes the logits a lot ...
        # ... and merging changes that by float rounding (float32) or int8 rounding of the merged weight
        assert (merged - unmerged).norm() / effect < (1e-4 if dtype == "float32" else 0.1)
    finally:
        generator.close()


async def test_an_adapter_used_alone_is_merged_while_idle_and_unmerged_when_it_leaves(tiny_model_dir, adapters):
    generator = LocalGenerator(load_backend(tiny_model_dir),
                               ServingSettings(max_adapters=2, merged_adapters=1, batch_window_ms=100))
    prompt = "나: 오늘 뭐 했어?\n하루:"

    async def merged_becomes(names: list[str]) -> None:
        for _ in range(500):
            if generator.stats()["merged"] == names:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"merged {generator.stats()['merged']}, wanted {names}")

    try:
        a, b, c = adapters[:3]
        [first] = await generator.sample(prompt, 1, GREEDY, [], a)
        await merged_becomes([a.name])
        [again] = await generator.sample(prompt, 1, GREEDY, [], a)
        assert again.text == first.text
        await asyncio.gather(generator.sample(prompt, 1, GREEDY, [], b), generator.sample(prompt, 1, GREEDY, [], None))
        await asyncio.sleep(0.2)
        assert generator.stats()["merged"] == [a.name]  # a batch shared with the base model wants no merge
        await generator.sample(prompt, 1, GREEDY, [], b)
        await merged_becomes([b.name])  # one merged copy at most: a's was dropped
        await generator.sample(prompt, 1, GREEDY, [], c)  # c evicts a (least recently used), then is merged
        await merged_becomes([c.name])
        assert set(generator.cache.slot_of) == {b.name, c.name}
        slot_c = generator.cache.slot_of[c.name]
        assert all(set(layer.merged) == {slot_c} for layer in generator.cache.layers.values())
        assert generator.stats()["merges"] == 3
    finally:
        generator.close()


async def test_a_cached_persona_prefix_samples_what_a_full_prefill_samples(tiny_model_dir, adapters):
    prefix = "하루는 다정한 친구야. 장난도 잘 치고 걱정도 많아.\n\n나: 안녕\n하루: 왔구나!\n\n"
    prompts = [prefix + "나: 안녕\n하루:",
               prefix + "나: 오늘 좀 길게 얘기해도 돼? 할 말이 많아\n하루: 응 얼마든지\n나: 회사에서 있었던 일인데\n하루:",
               prefix + "나: " + "정말 " * 40 + "피곤해\n하루:"]  # past the tiny model's 64-token sliding window
    plain = LocalGenerator(load_backend(tiny_model_dir), ServingSettings(prefix_cache=0, merged_adapters=0))
    cached = LocalGenerator(load_backend(tiny_model_dir), ServingSettings(prefix_cache=4, merged_adapters=0,
                                                                          batch_window_ms=50))
    try:
        for ref in (None, adapters[0]):
            want = [(await plain.sample(p, 2, GREEDY, [], ref))[0].text for p in prompts]
            for _ in range(2):  # the first computes the prefix, the second reuses it
                got = [(await cached.sample(p, 2, GREEDY, [], ref, prefix))[0].text for p in prompts]
                assert got == want
            batches = cached.batches
            together = await asyncio.gather(*(cached.sample(p, 1, GREEDY, [], ref, prefix) for p in prompts))
            assert [s[0].text for s in together] == want  # different lengths in one left-padded batch
            assert cached.batches - batches < len(prompts)
        stats = cached.stats()
        assert stats["prefix_misses"] == 2 and stats["prefix_hits"] == 2 * 3 * 2 - 2 + 3 * 2
        [other] = await cached.sample(prompts[0], 1, GREEDY, [], adapters[0], "다른 페르소나\n\n")
        assert other.text == want[0] and cached.stats()["prefix_misses"] == 2  # not its prefix: not reused
    finally:
        plain.close()
        cached.close()
