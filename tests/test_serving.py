"""Serving many users' adapters at once: mixed batches, the adapter cache, isolation, fallbacks."""

import asyncio
from pathlib import Path

import pytest
import torch

from bot.config import ModelSettings, SamplingSettings, ServingSettings
from bot.engine import UserRef
from bot.model import ModelBackend
from bot.serving import AdapterCache, AdapterError, AdapterRef, LocalGenerator, read_adapter

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


def test_a_mixed_batch_matches_peft_one_adapter_at_a_time(tiny_model_dir, adapters, generator):
    prompt = "나: 안녕\n하루:"
    reference = load_backend(tiny_model_dir)
    ids = reference.tokenizer(prompt, return_tensors="pt").input_ids
    expected = []
    for ref in adapters[:2]:
        reference.load_adapter(ref.name, ref.path)
        with torch.no_grad(), reference._use_adapter(ref.name):
            expected.append(reference.model(ids).logits[0])
    with torch.no_grad(), reference._use_adapter(None):
        expected.append(reference.model(ids).logits[0])

    slots = [generator.cache.acquire(ref) for ref in adapters[:2]]
    model = generator.backend.model
    generator.router.set([slots[0], slots[1], -1], 16, torch.float32, model.device)
    with torch.no_grad():
        logits = model(ids.repeat(3, 1)).logits
    generator.router.clear()
    for row, want in zip(logits, expected):
        torch.testing.assert_close(row, want, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(expected[0], expected[1]) and not torch.allclose(expected[0], expected[2])


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
