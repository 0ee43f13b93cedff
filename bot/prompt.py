"""Prompts from a persona and a history, and replies from raw samples.

Base models see a transcript, one line per turn, and are stopped at the line's end:

    <description and style notes>

    나: 안녕!                        <- example dialogue from the persona card
    하루: 왔구나~ 오늘 어땠어?

    나: 배고파                       <- the conversation, oldest turns dropped first
    하루:                            <- the model continues here

Instruct models get the same content through their tokenizer's chat template.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

from persona import PersonaCard

Role = Literal["user", "char"]
ELLIPSIS = " … "
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")  # control bytes and broken characters
_TURN_OVERHEAD = 4  # newline / role markers around each turn
WORD_JOINER = "\u2060"  # invisible; splits a typed control token so the tokenizer reads it as plain text


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str


@dataclass
class Prompt:
    text: str                      # exactly what the model is given
    stop: list[str]                # sampling stops at the first of these
    messages: list[dict[str, str]] = field(default_factory=list)  # the context as role/content messages
    dropped_turns: int = 0         # oldest history turns left out to fit the budget
    tokens: int = 0
    shortened_last: bool = False   # the newest turn had to be cut to fit the budget
    prefix: str = ""               # the start of `text` every chat with this persona shares (persona, examples)
    unconditional: str = ""        # the prompt with no conversation: what the persona says to nothing in
    # particular (a reply as likely here as after the user's message ignores it: bot/ranking.py)


def shorten(text: str, limit: int) -> tuple[str, bool]:
    """Keep the head and the tail of an over-long message, marking the cut with an ellipsis."""
    if len(text) <= limit:
        return text, False
    head = (limit - len(ELLIPSIS)) * 2 // 3
    tail = limit - len(ELLIPSIS) - head
    return text[:head].rstrip() + ELLIPSIS + text[len(text) - tail:].lstrip(), True


class ControlTokens:
    """A tokenizer's control tokens as text, indexed for `defuse`: Gemma 3 has 6,249 of them (`<eos>`,
    `<start_of_turn>`, `<unused42>`, ...), so a text is only searched where one of them could start."""

    def __init__(self, tokens: Iterable[str]):
        self.tokens = frozenset(t for t in tokens if len(t) > 1)
        self.firsts = frozenset(t[0] for t in self.tokens)
        self.lengths = sorted({len(t) for t in self.tokens}, reverse=True)

    def __bool__(self) -> bool:
        return bool(self.tokens)


def defuse(text: str, control: ControlTokens | None) -> str:
    """`text` with every model control token it contains (typed `<start_of_turn>`, `<eos>`, ...) broken by
    an invisible word joiner after its first character: the tokenizer then reads it as ordinary text,
    so what a user or a card writes can never end a turn, start one, or stop generation."""
    if not control or control.firsts.isdisjoint(text):
        return text
    pieces, start, i = [], 0, 0
    while i < len(text):
        length = next((n for n in control.lengths if text[i:i + n] in control.tokens), 0) \
            if text[i] in control.firsts else 0
        if length:
            pieces.append(text[start:i + 1] + WORD_JOINER)
            start = i + 1
        i += length or 1
    return "".join(pieces) + text[start:]


def one_line(text: str) -> str:
    return " ".join(text.split())


def build_prompt(card: PersonaCard, history: list[Turn], *, count_tokens: Callable[[str], int], budget: int,
                 chat_template: Callable[[list[dict[str, str]]], str] | None = None,
                 user_name: str | None = None, special_tokens: ControlTokens | None = None) -> Prompt:
    """Fit persona + as much recent history as the token budget allows (the last turn is always kept).

    Text from the user and the card is `defuse`d against the tokenizer's `special_tokens` first.
    """
    if special_tokens:
        card = card.defused(lambda text: defuse(text, special_tokens))
        history = [Turn(t.role, defuse(t.text, special_tokens)) for t in history]
    user = defuse(user_name or card.user_name(), special_tokens)
    persona_text = _persona_text(card, user)
    examples = [_example_text(card, ex, user) for ex in card.examples]

    def render(turns: list[Turn], with_examples: bool) -> Prompt:
        if chat_template is not None:
            system = persona_text
            if with_examples and examples:
                system += "\n\n" + "\n\n".join(examples)
            messages = [{"role": "system", "content": system}, *_chat_messages(turns)]
            try:  # the system part alone, rendered: its common start with the whole is shared by every chat
                system_only = chat_template(messages[:1])
            except Exception:  # some templates insist on a user turn
                system_only = ""
            text = chat_template(messages)
            return Prompt(text, [], messages, prefix=os.path.commonprefix([text, system_only]),
                          unconditional=system_only)
        lines = [persona_text, ""]
        if with_examples:
            for example in examples:
                lines += [example, ""]
        prefix = "\n".join(lines) + "\n"
        lines += [f"{_label(t.role, card, user)}: {one_line(t.text)}" for t in turns]
        lines.append(f"{card.name}:")
        messages = [{"role": "system", "content": persona_text}, *_chat_messages(turns)]
        return Prompt("\n".join(lines), ["\n"], messages, prefix=prefix, unconditional=f"{prefix}{card.name}:")

    # Count turns newest first and stop at the budget (a 2,000-turn history costs what fits, not all of
    # it), then check the real total and trim if needed.
    def turn_cost(i: int) -> int:
        return count_tokens(f"{_label(history[i].role, card, user)}: {one_line(history[i].text)}") + _TURN_OVERHEAD

    with_examples = count_tokens(render(history[-1:], True).text) <= budget
    room = budget - count_tokens(render([], with_examples).text)
    start = len(history) - 1
    room -= turn_cost(start) if history else 0
    while start > 0:
        cost = turn_cost(start - 1)
        if cost > room:
            break
        start -= 1
        room -= cost
    prompt = render(history[start:], with_examples)
    prompt.tokens = count_tokens(prompt.text)
    while prompt.tokens > budget and start < len(history) - 1:
        start += 1
        prompt = render(history[start:], with_examples)
        prompt.tokens = count_tokens(prompt.text)
    kept = history[start:]
    while prompt.tokens > budget and len(kept[-1].text) > 2 * len(ELLIPSIS):  # the newest turn alone is too long
        text, _ = shorten(kept[-1].text, int(len(kept[-1].text) * 0.8))
        kept[-1] = Turn(kept[-1].role, text)
        prompt = render(kept, with_examples)
        prompt.tokens = count_tokens(prompt.text)
        prompt.shortened_last = True
    prompt.dropped_turns = start
    return prompt


def clean_reply(raw: str, card: PersonaCard, user_name: str | None = None) -> str:
    """Strip a sampled reply down to the persona's own words for this turn ('' if nothing is left)."""
    user = user_name or card.user_name()
    text = _CONTROL.sub("", raw).strip()
    for label in (card.name, user):  # a model sometimes repeats its own label
        if text.startswith(label + ":"):
            text = text[len(label) + 1:].strip()
    for label in (user, card.name):  # ...or starts the next speaker's turn on the same line
        for marker in (f" {label}:", f"\n{label}:"):
            if marker in text:
                text = text[: text.index(marker)]
    return text.strip()


def _label(role: Role, card: PersonaCard, user: str) -> str:
    return card.name if role == "char" else user


def _persona_text(card: PersonaCard, user: str) -> str:
    parts = [card.render(card.description, user)]
    if card.style:
        parts.append(card.render(card.style, user))
    return "\n".join(p.strip() for p in parts if p.strip())


def _example_text(card: PersonaCard, turns: list[tuple[str, str]], user: str) -> str:
    return "\n".join(f"{_label(role, card, user)}: {one_line(card.render(text, user))}" for role, text in turns)


def _chat_messages(turns: list[Turn]) -> list[dict[str, str]]:
    """Role/content messages; consecutive turns of one speaker are merged (templates want alternation)."""
    messages: list[dict[str, str]] = []
    for turn in turns:
        role = "assistant" if turn.role == "char" else "user"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + turn.text
        else:
            messages.append({"role": role, "content": turn.text})
    return messages
