"""A model's tokenizer without its weights: everything building a prompt needs from the model.

    prompts = PromptTokenizer.load(settings.model)    # seconds: the weights are never read
    prompts.count_tokens(text)                        # token budgets
    prompts.chat_prompt(messages)                     # when prompts.use_chat_template
    prompts.special_tokens                            # control tokens, defused in what people write

The dialogue engine needs only this from the model, so a bot whose replies are sampled elsewhere (a
vLLM server) loads only this. `ModelBackend` (bot/model.py) is a PromptTokenizer with the weights.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as in bot/model.py: set before transformers is imported

from transformers import AutoTokenizer, PreTrainedTokenizerBase  # noqa: E402

from bot.config import ModelSettings  # noqa: E402
from bot.prompt import ControlTokens  # noqa: E402


class PromptTokenizer:
    """A model's tokenizer, the name and generation replies record, and whether prompts use the chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, name: str, use_chat_template: bool,
                 generation: str = "base"):
        self.tokenizer = tokenizer
        self.name = name
        self.use_chat_template = use_chat_template
        self.generation = generation

    @classmethod
    def load(cls, settings: ModelSettings) -> "PromptTokenizer":
        """The configured model's tokenizer alone (the embedded model is converted first if it never
        was, as `banryeo model prepare` does)."""
        from bot.model import load_error, resolve_model_path  # bot.model builds on this module

        source = resolve_model_path(settings)
        try:
            tokenizer, use_chat = load_tokenizer(source, settings.prompt_format)
        except OSError as exc:
            raise load_error(settings, exc) from None
        return cls(tokenizer, name=settings.name, use_chat_template=use_chat, generation=generation_label(settings))

    @functools.cached_property
    def special_tokens(self) -> ControlTokens:
        """The tokenizer's control tokens as text (`<eos>`, `<start_of_turn>`, ...): typed by a user or
        written in a card they are defused (bot.prompt.defuse), never read as control tokens."""
        added = [t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special]
        return ControlTokens([*self.tokenizer.all_special_tokens, *added])

    def count_tokens(self, text: str) -> int:
        """Tokens in `text`; safe to call from any thread while the generator's worker tokenizes batches."""
        return len(self._counting_tokenizer(text, add_special_tokens=False).input_ids)

    @functools.cached_property
    def _counting_tokenizer(self):
        # A copy of its own: a fast tokenizer switches padding on for the worker's batches and off for a
        # count, and two threads doing that to one tokenizer fail with "Already borrowed".
        return copy.deepcopy(self.tokenizer)

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


def load_tokenizer(source: str, prompt_format: str) -> tuple[PreTrainedTokenizerBase, bool]:
    """The tokenizer of a resolved model source (a folder or a hub id: bot.model.resolve_model_path), set up
    for left-padded batches, and whether prompts use its chat template. Raises OSError when it cannot load."""
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer, _wants_chat_template(prompt_format, tokenizer, Path(source))


def generation_label(settings: ModelSettings) -> str:
    """What replies on the model's own weights record as their generation: "base", or the folder name
    of the LoRA adapter merged into them (`model.adapter`)."""
    return settings.adapter.expanduser().name if settings.adapter is not None else "base"


def _wants_chat_template(prompt_format: str, tokenizer: PreTrainedTokenizerBase, source: Path) -> bool:
    if prompt_format != "auto":
        return prompt_format == "chat"
    marker = source / "banryeo.json"
    if marker.exists():
        return json.loads(marker.read_text()).get("prompt_format") == "chat"
    return bool(getattr(tokenizer, "chat_template", None))
