"""On the real embedded Gemma 3 270M model (converted once into the model cache; about a minute the first time)."""

import pytest

from bot.engine import DialogueEngine, UserRef
from bot.model import ModelBackend
from bot.store import Store
from persona import PersonaLibrary

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def embedded_backend(embedded_settings):
    # seeded: "most replies end at the line break" is a rate (about 0.85 here), and an unseeded draw of
    # three would fail now and then for no reason
    return ModelBackend.load(embedded_settings.model.model_copy(update={"seed": 1234}))


async def test_three_candidates_are_distinct_and_stop_at_the_turn(embedded_settings, embedded_backend, tmp_path):
    settings = embedded_settings.model_copy(deep=True)
    settings.sampling.max_new_tokens = 40
    store = Store(tmp_path / "banryeo.db")
    engine = DialogueEngine(store, embedded_backend, PersonaLibrary(), settings)
    try:
        user = UserRef("test", "embedded")
        card = engine.persona_of(user)
        offer = await engine.on_message(user, "오늘 회사에서 너무 힘들었어. 저녁 뭐 먹지?")
        assert len(offer.texts) == 3, offer.texts
        assert len(set(offer.texts)) == 3
        for text in offer.texts:
            assert text.strip() and "\n" not in text
            assert f"{card.user_name()}:" not in text and f"{card.name}:" not in text
        stored = store.candidate_set(offer.id)["candidates"]
        # each reply ended at the line break closing the persona's turn, not at the token limit
        assert sum(c["hit_stop"] for c in stored) >= 2, stored
        assert embedded_backend.model.dtype.is_floating_point
    finally:
        engine.close()
        store.close()


def test_english_persona_replies_on_the_embedded_model(embedded_backend):
    from bot.prompt import Turn, build_prompt, clean_reply

    card = PersonaLibrary().get("sam")
    prompt = build_prompt(card, [Turn("char", card.greetings[0]), Turn("user", "I'm so hungry. Any dinner ideas?")],
                          count_tokens=embedded_backend.count_tokens, budget=1024)
    from bot.config import SamplingSettings

    samples = embedded_backend.sample(prompt.text, 3, SamplingSettings(max_new_tokens=40), prompt.stop)
    replies = [clean_reply(s.text, card) for s in samples]
    assert sum(bool(r) for r in replies) >= 2, replies


def test_workers_starting_at_once_on_a_new_machine_convert_the_model_without_clashing(tmp_path):
    """Ray workers on a fresh machine may all convert the embedded model at the same moment: each converts
    into its own folder and exactly one complete folder ends up in place, loadable, with nothing left over."""
    import subprocess
    import sys

    from transformers import AutoConfig

    script = "import sys; from pathlib import Path; from bot.model import prepare_embedded; " \
             "print(prepare_embedded(Path(sys.argv[1])))"
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-1500:] for _, err in results]
    target = tmp_path / "gemma3-270m"
    assert {out.strip() for out, _ in results} == {str(target)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m-q4_k_m.gguf", "gemma3-270m"]  # no partials
    assert AutoConfig.from_pretrained(target).vocab_size == 262144
    assert (target / "model.safetensors").stat().st_size > 200_000_000
