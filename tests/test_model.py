"""The model backend: loading, batched sampling with stops, chat templates, clear load errors."""

import pytest

from bot.config import ModelSettings, SamplingSettings
from bot.model import ModelBackend, ModelError, cpu_has_bf16, resolve_dtype


def test_batched_samples_stop_at_the_first_stop_string(tiny_backend):
    samples = tiny_backend.sample("나: 안녕\n하루:", 3, SamplingSettings(max_new_tokens=30), stop=["\n", "하"])
    assert len(samples) == 3
    for s in samples:
        assert "\n" not in s.text and "하" not in s.text
        assert 0 < s.new_tokens <= 30


def test_auto_prompt_format_follows_the_chat_template(tiny_model_dir, tiny_chat_model_dir):
    plain = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="float32"))
    chat = ModelBackend.load(ModelSettings(name=str(tiny_chat_model_dir), dtype="float32"))
    assert not plain.use_chat_template and chat.use_chat_template
    rendered = chat.chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert rendered == "<|system|>S\n<|user|>U\n<|assistant|>"
    forced = ModelBackend.load(ModelSettings(name=str(tiny_chat_model_dir), dtype="float32",
                                             prompt_format="transcript"))
    assert not forced.use_chat_template


@pytest.mark.parametrize("name, fragment", [
    ("/no/such/model", "does not exist"),
    ("./relative/missing", "does not exist"),
    ("nobody/no-such-model-anywhere", "Offline mode"),
])
def test_missing_models_fail_with_a_clear_error(name, fragment):
    with pytest.raises(ModelError, match=fragment):
        ModelBackend.load(ModelSettings(name=name))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        ModelBackend.load(ModelSettings(name=str(tmp_path)))


def test_dtype_auto_is_bfloat16_only_on_cpus_that_compute_in_it():
    import torch

    assert cpu_has_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile")
    assert cpu_has_bf16("flags\t\t: fpu avx2 amx_bf16 amx_tile")
    assert not cpu_has_bf16("flags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni")
    assert resolve_dtype("auto") == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert resolve_dtype("float32") == torch.float32


def test_adapter_folder_must_be_a_peft_adapter(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="adapter_config.json"):
        ModelBackend.load(ModelSettings(name=str(tiny_model_dir), adapter=tmp_path))


def test_configured_lora_adapter_is_merged_into_the_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "gen-0001")
    backend = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="float32",
                                              adapter=tmp_path / "gen-0001"))
    plain = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="float32"))
    assert backend.generation == "gen-0001"
    assert not hasattr(backend.model, "peft_config")  # merged: a plain model again
    assert backend.completion_logprobs("안녕", [" 하루"]) != plain.completion_logprobs("안녕", [" 하루"])
    assert backend.sample("안녕", 2, SamplingSettings(max_new_tokens=4), stop=[])


def test_generation_adapters_are_loaded_beside_the_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "a")
    backend = ModelBackend.load(ModelSettings(name=str(tiny_model_dir), dtype="float32"))
    before = backend.completion_logprobs("나: 안녕\n하루:", [" 배고파\n"])
    backend.load_adapter("user/gen-1", tmp_path / "a")
    backend.load_adapter("user/gen-1", tmp_path / "a")  # idempotent
    assert backend.has_adapter("user/gen-1") and not backend.has_adapter("other")
    assert backend.completion_logprobs("나: 안녕\n하루:", [" 배고파\n"]) == before  # base unchanged
    with_adapter = backend.completion_logprobs("나: 안녕\n하루:", [" 배고파\n"], adapter="user/gen-1")
    assert with_adapter != before and with_adapter[0][1] == before[0][1]
    assert len(backend.sample("안녕", 2, SamplingSettings(max_new_tokens=4), stop=[], adapter="user/gen-1")) == 2
    with pytest.raises(ModelError):
        ModelBackend.load(ModelSettings(name=str(tiny_model_dir))).sample("x", 1, SamplingSettings(), [], "nope")


def test_the_few_rows_head_computes_the_same_logits():
    import torch

    from bot.model import FewRowsHead, use_few_rows_head

    class TiedModel(torch.nn.Module):
        def __init__(self, vocab: int, dtype=torch.float32):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, 16, dtype=dtype)
            self.head = torch.nn.Linear(16, vocab, bias=False, dtype=dtype)
            self.head.weight = self.embed.weight

        def get_output_embeddings(self):
            return self.head

    model = TiedModel(40000)
    inputs = [torch.randn(3, 1, 16), torch.randn(1, 64, 16)]
    expected = [torch.nn.functional.linear(x, model.head.weight) for x in inputs]
    assert use_few_rows_head(model) and isinstance(model.head, FewRowsHead)
    assert model.head.weight is model.embed.weight  # still tied
    for x, want in zip(inputs, expected):  # 3 rows (decoding) and 64 rows (the plain path)
        got = model.head(x)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 16, requires_grad=True)  # training takes the plain path, gradients and all
    model.head(x).sum().backward()
    assert x.grad is not None and model.embed.weight.grad is not None
    assert not use_few_rows_head(TiedModel(1000))                   # a small vocabulary gains nothing
    assert not use_few_rows_head(TiedModel(40000, torch.bfloat16))  # measured for float32 only
