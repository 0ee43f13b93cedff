"""The dialogue engine: platform-free. Chat adapters translate their events into these calls:

    engine = DialogueEngine(store, tokenizer, personas, settings)
    opening = await engine.open(user)                   # greeting when a conversation starts
    offer = await engine.on_message(user, "배고파")     # -> Offer with N numbered replies
    picked = await engine.on_pick(user, offer.id, 1)    # 0-based index; the pick continues the chat
    await engine.on_thumb(user, offer.id, +1)           # thumbs up/down on the picked reply
    offer = await engine.regenerate(user)               # new candidates for the same message
    opening = await engine.reset(user)                  # new conversation

Problems a user should hear about raise `EngineError(key, **params)`; adapters render the key with
`bot.messages.render` in the user's language. Requests of one user run one at a time (a lock per
user); sampling goes to a generator (bot/serving/) that batches requests of many users, each on
their own adapter, so other users' picks and bookkeeping never wait on it. The engine itself needs
only a tokenizer (a PromptTokenizer, or the ModelBackend that extends it with the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import sqlite3
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

from bot import ranking
from bot.config import Settings
from bot.generations import ADAPTER_ERROR, adapter_name, forget_generations, lineage_of, served_lineage
from bot.messages import LANGUAGES
from bot.prompt import Prompt, Turn, build_prompt, clean_reply, shorten
from bot.serving import AdapterError, AdapterRef, Generator, Pruning, Sample
from bot.serving.interface import OPENING
from bot.store import Store
from bot.tokenizer import PromptTokenizer
from persona import PersonaCard, PersonaError, PersonaLibrary

logger = logging.getLogger(__name__)

MAX_SAMPLING_ROUNDS = 3  # first round plus refills for empty or duplicate candidates


class EngineError(Exception):
    """Something the user should be told about; `key` names the message in bot.messages."""

    def __init__(self, key: str, /, **params: object):
        super().__init__(key)
        self.key = key
        self.params = params


@dataclass(frozen=True)
class UserRef:
    """Who is talking, as a platform knows them."""

    platform: str
    platform_id: str
    display_name: str = ""
    chat: str = ""  # where they talk: '' their private chat, else a group's or channel's id (its own conversation)
    locale: str = ""  # their app's language as the platform reports it ("ko", "en-US"); "" when it does not

    @property
    def id(self) -> str:
        return f"{self.platform}:{self.platform_id}"


@dataclass(frozen=True)
class Notice:
    """Something worth telling the user next to the replies (a message key and its parameters)."""

    key: str
    params: dict = field(default_factory=dict)


@dataclass
class Offer:
    """The candidate replies offered for one message. Stored as a candidate set (`candidate_sets`), whose
    id (`set_id` in the store and in button data) is the offer's id."""

    id: str
    texts: list[str]
    notices: list[Notice] = field(default_factory=list)
    auto_picked: bool = False        # only one distinct reply: it already continues the conversation
    opening: str | None = None       # the greeting, when this message started a new conversation
    generation: str = "base"
    persona_name: str = ""           # who speaks the candidates, e.g. "하루"
    language: str = "ko"             # the language of the bot's own words around them (notices, footer)


@dataclass
class Picked:
    set_id: str
    index: int
    text: str
    already: bool = False            # the same pick was made before; nothing changed
    persona_name: str = ""           # who said it, e.g. "하루"


@dataclass
class Opening:
    greeting: str | None             # None: the conversation was already going
    persona_name: str                # the persona's display name, e.g. "하루"
    hint: Notice | None = None       # the persona speaks another language than the user's app (language_hint)


class UserLocks:
    """One asyncio.Lock per user, kept only while someone holds or waits for it (no dict of every user ever)."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def hold(self, user_id: str):
        lock = self._locks.setdefault(user_id, asyncio.Lock())
        self._holders[user_id] = self._holders.get(user_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._holders[user_id] -= 1
            if not self._holders[user_id]:
                del self._holders[user_id], self._locks[user_id]

    def __len__(self) -> int:
        return len(self._locks)


def client_language(locale: str) -> str | None:
    """The bot's language for a platform's locale code ("en-US" -> "en"), None when it has no texts in it."""
    code = locale.split("-")[0].split("_")[0].lower()
    return code if code in LANGUAGES else None


class DialogueEngine:
    def __init__(self, store: Store, tokenizer: PromptTokenizer, personas: PersonaLibrary, settings: Settings,
                 generator: Generator | None = None):
        self.store = store
        self.tokenizer = tokenizer
        self.personas = personas
        self.settings = settings
        if generator is None:  # the default: sample in this process, with the tokenizer's model (a ModelBackend)
            from bot.serving import LocalGenerator

            generator = LocalGenerator(tokenizer, settings.serving)
        self.generator = generator
        self._user_locks = UserLocks()
        self._recent: defaultdict[str, deque[float]] = defaultdict(deque)  # per user: times of recent requests
        self._recent_pruned = time.monotonic()
        self._broken: set[str] = set()  # adapters that failed to load; their parents serve instead

    def close(self) -> None:
        self.generator.close()

    # -- users ----------------------------------------------------------------------------------

    def persona_of(self, user: UserRef) -> PersonaCard:
        row = self.store.user(user.id)
        key = row["persona"] if row else self.settings.chat.persona
        try:
            return self.personas.get(key)
        except PersonaError as exc:
            logger.warning("persona %r of %s is unusable (%s); using the default", key, user.id, exc)
            return self.personas.get(self._default_persona_key())

    def language_of(self, user: UserRef) -> str:
        """The language of the bot's own messages: `chat.language` when set, else the language of the user's
        app (reported with this event or remembered from an earlier one), else the persona's."""
        if self.settings.chat.language:
            return self.settings.chat.language
        remembered = self.store.user(user.id)
        return (client_language(user.locale) or (remembered and remembered["language"])
                or self.persona_of(user).language)

    def language_hint(self, user: UserRef) -> Notice | None:
        """When the persona speaks another language than the bot's messages: say so, and name a persona
        that speaks the user's language (if one ships)."""
        card = self.persona_of(user)
        language = self.language_of(user)
        if card.language == language:
            return None
        others = [key for key in self.personas.keys() if self._card_language(key) == language]
        if not others:
            return Notice("persona_language_note", {"persona": card.name})
        return Notice("persona_language_hint", {"persona": card.name, "suggestion": others[0]})

    def _card_language(self, key: str) -> str | None:
        try:
            return self.personas.get(key).language
        except PersonaError:
            return None

    def persona_keys(self) -> list[str]:
        return self.personas.keys()

    # -- platform messages that show an offer ------------------------------------------------------

    def link_message(self, platform: str, message_key: str, set_id: str) -> None:
        """Remember that platform message `message_key` shows offer `set_id` (for reactions and late picks)."""
        self.store.link_message(platform, message_key, set_id)

    def offer_shown_in(self, platform: str, message_key: str) -> str | None:
        """The id of the offer a platform message shows, if it shows one."""
        return self.store.set_for_message(platform, message_key)

    def _default_persona_key(self) -> str:
        return self.settings.chat.persona if self.settings.chat.persona in self.personas.keys() else \
            PersonaLibrary.DEFAULT_KEY

    def _ensure_user(self, user: UserRef) -> dict:
        row = self.store.ensure_user(user.id, user.platform, user.platform_id, user.display_name,
                                     self._default_persona_key())
        language = client_language(user.locale)
        if language and row["language"] != language:  # remembered for events that carry no locale
            self.store.update_user(user.id, language=language)
        return row

    def _start_conversation(self, user: UserRef) -> tuple[int, str]:
        card = self.persona_of(user)
        greeting = card.render(random.choice(card.greetings))
        return self.store.start_conversation(user.id, card.key, greeting, user.chat), greeting

    # -- the chat -------------------------------------------------------------------------------

    async def open(self, user: UserRef) -> Opening:
        """Make sure the user has a conversation; returns its greeting when one was started."""
        async with self._user_locks.hold(user.id):
            self._ensure_user(user)
            card = self.persona_of(user)
            if self.store.active_conversation(user.id, user.chat):
                return Opening(None, card.name, self.language_hint(user))
            _, greeting = self._start_conversation(user)
            return Opening(greeting, card.name, self.language_hint(user))

    async def on_message(self, user: UserRef, text: str) -> Offer:
        """Store the user's message and offer candidate replies for it."""
        text = text.replace("\x00", "").strip()
        if not text:
            raise EngineError("empty_message")
        self._admit(user)
        async with self._user_locks.hold(user.id):
            self._ensure_user(user)
            opening = None
            conversation = self.store.active_conversation(user.id, user.chat)
            if conversation is None:
                conversation_id, opening = self._start_conversation(user)
            else:
                conversation_id = conversation["id"]
            self.store.close_open_sets(user.id, "skipped", user.chat)  # a new message answers no earlier offer
            turn_id = self.store.add_turn(conversation_id, user.id, "user", text, "typed")
            offer = await self._offer(user, conversation_id, turn_id)
            offer.opening = opening
            hint = self.language_hint(user) if opening else None
            if hint:  # a first conversation: say which language the persona speaks
                offer.notices.insert(0, hint)
            return offer

    async def regenerate(self, user: UserRef, set_id: str | None = None) -> Offer:
        """New candidates for the user's latest message (while no reply to it has been picked).

        With `set_id` (a 🔄 pressed on a particular offer) that offer must be the user's open one.
        """
        self._admit(user)
        async with self._user_locks.hold(user.id):
            if set_id is not None:
                self.check_open(user, set_id)
            conversation = self.store.active_conversation(user.id, user.chat)
            turns = self.store.turns(conversation["id"]) if conversation else []
            if not turns or turns[-1]["role"] != "user":
                raise EngineError("nothing_to_regenerate")
            self.store.close_open_sets(user.id, "regenerated", user.chat)
            return await self._offer(user, conversation["id"], turns[-1]["id"])

    def check_open(self, user: UserRef, set_id: str) -> None:
        """Raise the EngineError a user should hear unless `set_id` is their offer still open for picking."""
        offer = self.store.candidate_set(set_id)
        if offer is None or offer["user_id"] != user.id:
            raise EngineError("pick_unknown")
        if offer["status"] == "picked":
            raise EngineError("pick_already", index=self.store.pick_of(set_id)["idx"] + 1)
        if offer["status"] != "open":
            raise EngineError("pick_stale")

    async def on_pick(self, user: UserRef, set_id: str, index: int) -> Picked:
        """Record that `user` chose candidate `index` (0-based) of set `set_id`."""
        async with self._user_locks.hold(user.id):
            offer = self.store.candidate_set(set_id)
            if offer is None or offer["user_id"] != user.id:
                raise EngineError("pick_unknown")
            if offer["status"] == "picked":
                return self._repeated_pick(offer, index)
            if offer["status"] != "open":
                raise EngineError("pick_stale")
            count = len(offer["candidates"])
            if not 0 <= index < count:
                raise EngineError("pick_out_of_range", count=count)
            try:
                self.store.record_pick(offer, index)
            except sqlite3.IntegrityError:  # picked in the meantime by another process
                return self._repeated_pick(self.store.candidate_set(set_id), index)
            await self._learn_ranking(user)
            return Picked(set_id, index, offer["candidates"][index]["text"], persona_name=self.persona_of(user).name)

    async def on_thumb(self, user: UserRef, set_id: str, value: int) -> bool:
        """Thumbs up (+1), down (-1) or cleared (0) on the reply picked from set `set_id`.

        Returns False when there is no picked reply of this user to rate (an open or someone else's set).
        Thumbs are unpaired feedback for the KTO stage of the nightly training.
        """
        async with self._user_locks.hold(user.id):
            offer = self.store.candidate_set(set_id)
            pick = self.store.pick_of(set_id) if offer is not None and offer["user_id"] == user.id else None
            if pick is None:
                return False
            if value:
                self.store.set_reaction(user.id, pick["turn_id"], 1 if value > 0 else -1, "👍" if value > 0 else "👎")
            else:
                self.store.clear_reaction(user.id, pick["turn_id"])
            return True

    async def reset(self, user: UserRef) -> Opening:
        """End the conversation (it stays stored) and start a new one."""
        self._rate_limit(user)
        async with self._user_locks.hold(user.id):
            self._ensure_user(user)
            _, greeting = self._start_conversation(user)
            return Opening(greeting, self.persona_of(user).name, self.language_hint(user))

    async def set_persona(self, user: UserRef, key: str) -> Opening:
        """Switch the user's persona; a new conversation starts with its greeting."""
        try:
            card = self.personas.get(key)
        except PersonaError:
            raise EngineError("persona_unknown", key=key, personas=", ".join(self.personas.keys())) from None
        self._rate_limit(user)
        async with self._user_locks.hold(user.id):
            self._ensure_user(user)
            self.store.update_user(user.id, persona=card.key)
            _, greeting = self._start_conversation(user)
            return Opening(greeting, card.name, self.language_hint(user))

    async def set_learning(self, user: UserRef, enabled: bool) -> None:
        """Opt out of (or back into) learning: picks and thumbs stay stored but no training run uses them,
        and the ranking they taught is dropped (offers are ranked by the model's signals alone)."""
        async with self._user_locks.hold(user.id):
            self._ensure_user(user)
            self.store.update_user(user.id, learning_opt_out=0 if enabled else 1)
            if enabled:  # their stored picks count again: so does what they taught the ranking
                await self._learn_ranking(user)
            else:
                self.store.drop_ranker(user.id)

    def learning_enabled(self, user: UserRef) -> bool:
        row = self.store.user(user.id)
        return not (row and row["learning_opt_out"])

    # -- the user's own data ---------------------------------------------------------------------

    async def export(self, user: UserRef) -> dict:
        """Everything stored about `user`, as JSON-ready data (read off the event loop: it can be large)."""
        async with self._user_locks.hold(user.id):
            return await asyncio.to_thread(self.store.export_user, user.id)

    async def forget(self, user: UserRef) -> None:
        """Delete the user's conversations, picks and reactions, and their own generations: rows, adapter
        folders (partial ones too), the served copies in the generator and what the nightly summaries
        kept. A night training on their picks right now discards its result (training/rollover.py)."""
        async with self._user_locks.hold(user.id):
            await asyncio.to_thread(self.store.forget_user, user.id)
            await asyncio.to_thread(forget_generations, self.store, self.settings, user.id)
            own = served_lineage(user.id)
            self._broken = {name for name in self._broken if not name.startswith(own + "-gen-")}
            await self.generator.evict_lineage(own)

    # -- internals ------------------------------------------------------------------------------

    def _admit(self, user: UserRef) -> None:
        """Backpressure before anything is stored: a per-user rate and a bound on the model's queue."""
        self._rate_limit(user)
        if self.generator.pending() >= self.settings.serving.max_queue:
            self._recent[user.id].pop()  # refused: it does not count against their rate
            raise EngineError("busy")

    def _rate_limit(self, user: UserRef) -> None:
        """At most `chat.messages_per_minute` messages, regenerates, resets and persona switches a minute."""
        now = time.monotonic()
        if now - self._recent_pruned > 60:  # drop users quiet for a minute: the dict holds only active ones
            self._recent_pruned = now
            for quiet in [key for key, times in self._recent.items() if not times or now - times[-1] > 60]:
                del self._recent[quiet]
        recent = self._recent[user.id]
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= self.settings.chat.messages_per_minute:
            raise EngineError("slow_down", seconds=max(1, math.ceil(60 - (now - recent[0]))))
        recent.append(now)

    def _repeated_pick(self, offer: dict, index: int) -> Picked:
        earlier = self.store.pick_of(offer["id"])
        if earlier["idx"] != index:
            raise EngineError("pick_already", index=earlier["idx"] + 1)
        return Picked(offer["id"], index, earlier["text"], already=True)

    async def _offer(self, user: UserRef, conversation_id: int, user_turn_id: int) -> Offer:
        card = self.persona_of(user)
        # reading a long conversation and counting its tokens: off the event loop, where others' events wait
        prompt, notices = await asyncio.to_thread(self._prompt, card, conversation_id, user_turn_id)
        weights = self._ranker_weights(user)
        replies, adapter = await self._sample_distinct(prompt, card, user, weights)
        generation = adapter.name if adapter else self.tokenizer.generation
        wanted = self.settings.sampling.candidates
        if not replies:
            raise EngineError("no_reply")
        ranked = ranking.score_samples(replies, weights, self.settings.ranking) \
            if self.settings.ranking.enabled else [ranking.Scored(t, s, None, None) for t, s in replies.items()]
        shown = [item for item in ranked if not item.sample.pruned][:wanted]  # a pruned reply is unfinished
        if self.settings.ranking.shuffle_shown:
            random.shuffle(shown)  # the number a reply gets says nothing about its rank
        if len(shown) < wanted:
            notices.append(Notice("fewer_candidates", {"count": len(shown)}))
        rank_of = {id(item): i for i, item in enumerate(ranked)}
        set_id = self.store.add_candidate_set(
            conversation_id=conversation_id, user_id=user.id, user_turn_id=user_turn_id, persona=card.key,
            prompt=prompt.text, context=prompt.messages, prompt_tokens=prompt.tokens,
            dropped_turns=prompt.dropped_turns, model=self.tokenizer.name, generation=generation,
            sampling=self.settings.sampling.model_dump(),
            candidates=[{"text": item.text, "new_tokens": item.sample.new_tokens, "hit_stop": item.sample.hit_stop,
                         "shown": item in shown, "ranked": rank_of[id(item)] if item.score is not None else None,
                         "score": item.score, "logprob": item.sample.logprob, "relevance": item.sample.relevance,
                         "state": item.state.tobytes() if item.state is not None else None,
                         "pruned": item.sample.pruned}
                        for item in shown + [item for item in ranked if item not in shown]],
        )
        texts = [item.text for item in shown]
        auto = len(texts) == 1
        if auto:
            self.store.record_pick(self.store.candidate_set(set_id), 0, auto=True)
        return Offer(set_id, texts, notices, auto_picked=auto, generation=generation, persona_name=card.name,
                     language=self.language_of(user))

    def _ranker_weights(self, user: UserRef) -> list[float] | None:
        """The user's learned ranking (None: the prior), unless they opted out of learning."""
        if not self.settings.ranking.learn or not self.learning_enabled(user):
            return None
        return self.store.ranker(user.id)

    async def _learn_ranking(self, user: UserRef) -> None:
        """Fit the user's ranker to their recent picks (after each pick: their next offer reflects it)."""
        cfg = self.settings.ranking
        if not (cfg.enabled and cfg.learn and self.learning_enabled(user)):
            return

        def learn() -> None:
            history = ranking.pick_features(self.store.ranking_history(user.id, cfg.history_picks), cfg)
            if history:
                self.store.save_ranker(user.id, ranking.fit(history, self.store.ranker(user.id), cfg), len(history))
        try:
            await asyncio.to_thread(learn)
        except Exception:  # the pick is stored either way; the next pick fits again
            logger.exception("learning the ranking of %s failed", user.id)

    def _prompt(self, card: PersonaCard, conversation_id: int, user_turn_id: int) -> tuple[Prompt, list[Notice]]:
        """The prompt for the conversation's newest message, and a notice when that message was shortened."""
        limit = self.settings.chat.max_message_chars
        notices = []
        history = []
        for row in self.store.turns(conversation_id):
            text, was_cut = shorten(row["text"], limit)
            history.append(Turn(row["role"], text))
            if was_cut and row["id"] == user_turn_id:
                notices.append(Notice("message_shortened", {"length": len(row["text"]), "limit": limit}))
        prompt = build_prompt(card, history, count_tokens=self.tokenizer.count_tokens,
                              budget=self.settings.chat.max_context_tokens,
                              chat_template=self.tokenizer.chat_prompt if self.tokenizer.use_chat_template else None,
                              special_tokens=self.tokenizer.special_tokens)
        if prompt.shortened_last and not notices:
            newest = history[-1].text
            notices.append(Notice("message_shortened", {"length": len(newest), "limit": len(newest)}))
        return prompt, notices

    def _serving_adapter(self, user: UserRef) -> AdapterRef | None:
        """The adapter of the generation served to `user` now (None: the base model).

        Read once per request, so a reply is finished on the generation it started with even if a
        newer one is promoted meanwhile; the generator loads it beside the old one when needed.
        A generation whose adapter failed to load is skipped for its parent (or the base model).
        """
        generation = self.store.serving(lineage_of(user.id, self.settings))
        while generation is not None:
            ref = AdapterRef(adapter_name(generation), Path(generation["path"]))
            if ref.name not in self._broken:
                return ref
            generation = self.store.generation(generation["parent_id"]) if generation["parent_id"] else None
        return None

    async def _sample_distinct(self, prompt: Prompt, card: PersonaCard, user: UserRef,
                               weights: list[float] | None = None) -> tuple[dict[str, Sample], AdapterRef | None]:
        """Distinct non-empty replies (cleaned text -> sample): `sampling.samples` of them asked for in one
        batched call (with the model's signals when ranking), more only while fewer than
        `sampling.candidates` are distinct (for up to MAX_SAMPLING_ROUNDS calls).

        An adapter that cannot be served (a missing or corrupt folder) falls back to the previous
        generation (or the base model), and the problem is recorded where admins see it (`/status`, the log).
        """
        adapter = self._serving_adapter(user)
        offered = self.settings.sampling.candidates
        cfg = self.settings.ranking
        ranked = cfg.enabled and getattr(self.generator, "signals", False)
        wanted = max(self.settings.sampling.samples, offered) if ranked else offered
        unconditional = (prompt.unconditional or None) if ranked else None
        pruning = None
        if ranked and cfg.continue_best:  # openings rated by the user's ranker (`weights`; None: the prior)
            pruning = Pruning(OPENING, max(cfg.continue_best, offered),
                              lambda samples: ranking.scores(samples, weights, cfg))
        kept: dict[str, Sample] = {}
        for _ in range(MAX_SAMPLING_ROUNDS):
            missing = wanted - len(kept)
            try:
                samples = await self.generator.sample(prompt.text, missing, self.settings.sampling, prompt.stop,
                                                      adapter, prompt.prefix, unconditional=unconditional,
                                                      pruning=pruning)
            except AdapterError as exc:
                self._broken.add(adapter.name)
                self.store.set_flag(ADAPTER_ERROR + adapter.name, str(exc)[:500])
                fallback = self._serving_adapter(user)
                logger.error("adapter %s cannot be served (%s); serving %s instead", adapter.name, exc,
                             fallback.name if fallback else "the base model")
                adapter = fallback
                continue
            except Exception:
                logger.exception("sampling failed")
                raise EngineError("model_error") from None
            for s in samples:
                text = clean_reply(s.text, card)
                if text in kept and kept[text].pruned and not s.pruned:  # the whole reply over its opening
                    kept[text] = s
                elif text and text not in kept and len(kept) < wanted:
                    kept[text] = s
            complete = sum(not s.pruned for s in kept.values())
            if complete >= offered:
                break
            wanted = len(kept) + offered - complete  # refills: only what the offer lacks
        return kept, adapter
