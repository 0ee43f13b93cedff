"""Import picks made elsewhere (another bot, an older install) exactly as live picks are stored.

    banryeo picks import picks.jsonl             # all or nothing: "imported 120 picks for 3 users"
    banryeo picks import - < picks.jsonl         # from standard input
    banryeo picks import picks.jsonl --dry-run   # check every line, store nothing

    records = read_pick_lines(open("picks.jsonl"), ImportRules.of(store, settings))
    summary = import_pick_records(store, settings, records, backend.count_tokens)

The file holds one JSON object per line; blank lines and lines starting with '#' are skipped:

    {"user": "telegram:123456", "persona": "haru",
     "context": [{"role": "assistant", "content": "왔구나~"}, {"role": "user", "content": "배고파"}],
     "chosen": "라면 끓여 줄까?", "rejected": ["밥은 먹었어?", "나도 배고파"]}

    key         required  value
    user        yes       "platform:id", e.g. "telegram:123456", "discord:42" (platform: letters, digits, _ and -)
    context     yes       the dialogue up to the message answered, oldest first: {"role": "user" | "assistant",
                          "content": text}; the last one is the user's
    chosen      yes       the reply the user picked
    rejected    yes       the replies offered beside it: 1 to 9 texts, none equal to chosen or to each other
    persona     no        a persona key; default: the user's persona (a new user: chat.persona)
    prompt      no        the exact prompt the model saw; default: built from the persona and the context as
                          for a live message (same budget, long messages shortened the same way)
    created_at  no        when the pick was made, ISO-8601 with a time zone ("2024-05-01T21:30:00+09:00");
                          default: now

Any other key is an error, so a misspelt key is never silently ignored. Every text may be up to
4 x chat.max_message_chars characters (longer ones are refused; the prompt shortens long messages as
it does live ones). Replies are one line: line breaks in chosen and rejected fold to spaces, as
sampled replies do.

Each record is stored the way a live pick is: the user (created with the default persona if new), a
conversation that is already over holding the context (user messages as "typed" turns, assistant
messages as "greeting" turns: the schema allows no other source for a persona turn that was not picked
here), a candidate set of chosen + rejected in an order shuffled by the record's content (the same file
always gives the same order), generation "imported", and the pick, which adds the chosen reply as a
turn. A user's live conversation is left alone and rate limits do not apply. Users who turned learning
off are refused. Every record is checked and every prompt built before anything is written; then all of
them are written in one transaction, so an import is stored whole or not at all.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.config import ChatSettings, ModelSettings, Settings
from bot.prompt import ControlTokens, Prompt, Turn, build_prompt, one_line, shorten
from bot.store import Store, now
from persona import PersonaCard, PersonaLibrary

if TYPE_CHECKING:
    from bot.model import ModelBackend

REQUIRED_KEYS = ("user", "context", "chosen", "rejected")
OPTIONAL_KEYS = ("persona", "prompt", "created_at")
MAX_REJECTED = 9
TEXT_LIMIT_FACTOR = 4          # an imported text may be this many times chat.max_message_chars long
GENERATION = "imported"        # the generation every imported candidate set names
USER_ID = re.compile(r"([A-Za-z0-9_-]+):(\S+)")
ROLES = {"user": "user", "assistant": "char"}           # record role -> turn role
SOURCES = {"user": "typed", "char": "greeting"}         # turn role -> turn source of a context turn


class PickImportError(Exception):
    """Records that cannot be imported; `errors` holds one line per problem ("line 3: ...")."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class ImportSummary:
    picks: int
    users: int

    @classmethod
    def of(cls, records: list[dict]) -> ImportSummary:
        return cls(len(records), len({record["user"] for record in records}))


def _nobody(user_id: str) -> bool:
    return False


@dataclass(frozen=True)
class ImportRules:
    """What records are checked against besides their shape; the defaults check the shape alone."""

    max_chars: int = ChatSettings().max_message_chars * TEXT_LIMIT_FACTOR
    personas: frozenset[str] | None = None               # known persona keys; None: any key
    learning_off: Callable[[str], bool] = _nobody        # user id -> opted out of learning

    @classmethod
    def of(cls, store: Store, settings: Settings) -> ImportRules:
        """The rules of this installation: its message limit, its personas, its users' learning switches."""
        def learning_off(user_id: str) -> bool:
            row = store.user(user_id)
            return bool(row and row["learning_opt_out"])

        return cls(settings.chat.max_message_chars * TEXT_LIMIT_FACTOR,
                   frozenset(PersonaLibrary(settings.storage.persona_dir).keys()), learning_off)


# -- reading and checking records -------------------------------------------------------------------


def read_text_lines(name: str) -> list[str]:
    """The lines of file `name` ("-": standard input) as UTF-8 text; PickImportError when it cannot be read."""
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).expanduser().read_bytes()
    except FileNotFoundError:
        raise PickImportError([f"{name}: no such file"]) from None
    except IsADirectoryError:
        raise PickImportError([f"{name}: is a folder, not a file of pick records"]) from None
    except OSError as exc:
        raise PickImportError([f"{name}: cannot read the file ({exc.strerror or exc})"]) from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise PickImportError([f"line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                               "save the file as UTF-8"]) from None
    return text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and other line separators


def read_pick_lines(lines: Iterable[str], rules: ImportRules = ImportRules(), source: str = "the input"
                    ) -> list[dict]:
    """Parse and check JSONL lines; PickImportError lists every bad line (and nothing is returned)."""
    records, errors = [], []
    for number, line in enumerate(lines, 1):
        text = line.removeprefix("\ufeff").rstrip()  # leading blanks stay: JSON columns count from the line's start
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            record = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: not JSON ({exc.msg} at column {exc.colno})")
            continue
        except _DuplicateKey as exc:
            errors.append(f"line {number}: key '{exc}' appears twice")
            continue
        problems = validate_pick_record(record, number, rules)
        errors += problems
        if not problems:
            records.append(record)
    if errors:
        raise PickImportError(errors)
    if not records:
        raise PickImportError([f"no pick records in {source}"])
    return records


def validate_pick_record(record: dict, line: int, rules: ImportRules = ImportRules()) -> list[str]:
    """Every problem of one record, each as "line N: ..."; an empty list means it can be imported."""
    if not isinstance(record, dict):
        return [f"line {line}: a pick record must be a JSON object, not {_json_type(record)}"]
    known = REQUIRED_KEYS + OPTIONAL_KEYS
    problems = [f"unknown key '{key}' (known: {', '.join(known)})" for key in record if key not in known]
    problems += [f"missing '{key}'" for key in REQUIRED_KEYS if key not in record]
    if "user" in record:
        problems += _user_problems(record["user"], rules)
    if "context" in record:
        problems += _context_problems(record["context"], rules)
    if "chosen" in record:
        problems += _reply_problems("'chosen'", record["chosen"], rules)
    if "rejected" in record:
        problems += _rejected_problems(record["rejected"], record.get("chosen"), rules)
    if "persona" in record:
        problems += _persona_problems(record["persona"], rules)
    if "prompt" in record and not (isinstance(record["prompt"], str) and record["prompt"].strip()):
        problems.append("'prompt' must be a non-empty text")
    if "created_at" in record:
        problems += _time_problems(record["created_at"])
    return [f"line {line}: {problem}" for problem in problems]


def _user_problems(user: Any, rules: ImportRules) -> list[str]:
    if not isinstance(user, str) or not USER_ID.fullmatch(user):
        return [f"'user' must be \"platform:id\", e.g. \"telegram:123456\" (got {_shown(user)})"]
    if rules.learning_off(user):
        return [f"user '{user}' has turned learning off; their picks are not imported"]
    return []


def _context_problems(context: Any, rules: ImportRules) -> list[str]:
    if not isinstance(context, list) or not context:
        return ["'context' must be a non-empty list of {\"role\": ..., \"content\": ...} messages"]
    problems = []
    for number, message in enumerate(context, 1):
        where = f"context message {number}"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            problems.append(f"{where} must be an object with just \"role\" and \"content\"")
            continue
        if message["role"] not in ROLES:
            problems.append(f"{where}: 'role' must be \"user\" or \"assistant\" "
                            f"(got {_shown(message['role'])})")
        problems += _text_problems(where, message["content"], message_text, rules)
    if isinstance(context[-1], dict) and context[-1].get("role") == "assistant":
        problems.append("the last context message must be the user's (role \"user\"): the message the pick answers")
    return problems


def _reply_problems(what: str, reply: Any, rules: ImportRules) -> list[str]:
    return _text_problems(what, reply, reply_text, rules)


def _rejected_problems(rejected: Any, chosen: Any, rules: ImportRules) -> list[str]:
    if not isinstance(rejected, list) or not 1 <= len(rejected) <= MAX_REJECTED:
        return [f"'rejected' must be a list of 1 to {MAX_REJECTED} texts"]
    problems, seen = [], {}
    chosen_text = reply_text(chosen) if isinstance(chosen, str) else None
    for number, reply in enumerate(rejected, 1):
        where = f"rejected text {number}"
        found = _reply_problems(where, reply, rules)
        problems += found
        if found:
            continue
        text = reply_text(reply)
        if text == chosen_text:
            problems.append(f"{where} is the same as 'chosen'")
        elif text in seen:
            problems.append(f"{where} repeats rejected text {seen[text]}")
        seen.setdefault(text, number)
    return problems


def _text_problems(what: str, value: Any, clean: Callable[[str], str], rules: ImportRules) -> list[str]:
    if not isinstance(value, str):
        return [f"{what} must be a text, not {_json_type(value)}"]
    text = clean(value)
    if not text:
        return [f"{what} is empty"]
    if len(text) > rules.max_chars:
        return [f"{what} is too long ({len(text)} characters; at most {rules.max_chars})"]
    return []


def _persona_problems(persona: Any, rules: ImportRules) -> list[str]:
    if not isinstance(persona, str) or not persona:
        return [f"'persona' must be a persona key such as \"haru\" (got {_shown(persona)})"]
    if rules.personas is not None and persona not in rules.personas:
        return [f"unknown persona '{persona}' (known: {', '.join(sorted(rules.personas))})"]
    return []


def _time_problems(value: Any) -> list[str]:
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return [f"'created_at' must be an ISO-8601 time such as \"2024-05-01T21:30:00+09:00\" (got {_shown(value)})"]
    if moment.tzinfo is None:
        return [f"'created_at' needs a time zone, e.g. \"2024-05-01T21:30:00+09:00\" or \"...Z\" (got {_shown(value)})"]
    return []


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object, refusing a key given twice (JSON would silently keep the last)."""
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def _shown(value: Any) -> str:
    """A value as it was written in the file."""
    return json.dumps(value, ensure_ascii=False)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a text", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -- texts as the engine stores them ------------------------------------------------------------------


def message_text(text: str) -> str:
    """A context message as the engine stores a typed one (NUL bytes removed, ends stripped)."""
    return text.replace("\x00", "").strip()


def reply_text(text: str) -> str:
    """A candidate reply as sampled replies are: one line (bot/prompt.py one_line)."""
    return one_line(text.replace("\x00", ""))


def parse_time(value: str) -> str:
    """An ISO-8601 time with a zone, in the store's own format (UTC, milliseconds)."""
    return datetime.fromisoformat(value).astimezone(timezone.utc).isoformat(timespec="milliseconds")


# -- building prompts ---------------------------------------------------------------------------------


def live_prompt(card: PersonaCard, turns: list[Turn], settings: Settings, count_tokens: Callable[[str], int],
                chat_template: Callable[[list[dict[str, str]]], str] | None = None,
                special_tokens: ControlTokens | None = None) -> Prompt:
    """The prompt a live message after `turns` gets (bot/engine.py `_offer`): long messages shortened, same budget."""
    limit = settings.chat.max_message_chars
    history = [Turn(turn.role, shorten(turn.text, limit)[0]) for turn in turns]
    return build_prompt(card, history, count_tokens=count_tokens, budget=settings.chat.max_context_tokens,
                        chat_template=chat_template, special_tokens=special_tokens)


def load_prompt_backend(model: ModelSettings) -> ModelBackend:
    """The configured model's tokenizer in a backend without weights, for counting tokens and chat templates.

    Loads in seconds; the embedded model is converted first if it never was (as `banryeo model prepare` does).
    """
    from bot.model import ModelBackend
    from bot.tokenizer import PromptTokenizer

    prompts = PromptTokenizer.load(model)
    return ModelBackend(None, prompts.tokenizer, name=model.name, use_chat_template=prompts.use_chat_template)


# -- storing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PreparedPick:
    """One record made ready to store: everything computed, nothing written yet."""

    user_id: str
    persona: str
    turns: list[Turn]
    prompt: Prompt
    prompt_text: str
    prompt_tokens: int
    candidates: list[dict]
    chosen_index: int
    created_at: str


def import_pick_records(store: Store, settings: Settings, records: list[dict], count_tokens: Callable[[str], int],
                        model_name: str = "imported", *,
                        chat_template: Callable[[list[dict[str, str]]], str] | None = None,
                        special_tokens: ControlTokens | None = None) -> ImportSummary:
    """Store `records` as picks, all or nothing.

    Every record is checked first (PickImportError lists every problem, "line N" being the Nth record, and
    nothing is stored); prompts are built before the transaction, so the database is locked only for the
    writes. `chat_template` renders prompts for instruct models (the backend's `chat_prompt` when it uses one).
    """
    rules = ImportRules.of(store, settings)
    errors = [error for number, record in enumerate(records, 1)
              for error in validate_pick_record(record, number, rules)]
    if errors:
        raise PickImportError(errors)
    if not records:
        raise PickImportError(["no pick records to import"])
    personas = PersonaLibrary(settings.storage.persona_dir)
    new_user_persona = _default_persona(settings, personas)
    prepared = [_prepare(record, store, settings, personas, count_tokens, chat_template, special_tokens) for record in records]
    with store.transaction():
        for pick in prepared:
            _store(store, pick, model_name, new_user_persona)
    return ImportSummary.of(records)


def _default_persona(settings: Settings, personas: PersonaLibrary) -> str:
    """The persona a new user gets (as the engine decides it)."""
    return settings.chat.persona if settings.chat.persona in personas.keys() else PersonaLibrary.DEFAULT_KEY


def _persona_of(record: dict, store: Store, settings: Settings, personas: PersonaLibrary) -> str:
    """The record's persona, else the user's own (when still known), else a new user's."""
    if "persona" in record:
        return record["persona"]
    row = store.user(record["user"])
    if row and row["persona"] in personas.keys():
        return row["persona"]
    return _default_persona(settings, personas)


def _prepare(record: dict, store: Store, settings: Settings, personas: PersonaLibrary,
             count_tokens: Callable[[str], int], chat_template: Callable | None,
             special_tokens: ControlTokens | None = None) -> _PreparedPick:
    persona = _persona_of(record, store, settings, personas)
    turns = [Turn(ROLES[m["role"]], message_text(m["content"])) for m in record["context"]]
    prompt = live_prompt(personas.get(persona), turns, settings, count_tokens, chat_template, special_tokens)
    prompt_text = record.get("prompt", prompt.text)
    chosen = reply_text(record["chosen"])
    texts = [chosen, *(reply_text(r) for r in record["rejected"])]
    random.Random(json.dumps(record, sort_keys=True)).shuffle(texts)  # the chosen reply is not always first
    return _PreparedPick(
        user_id=record["user"], persona=persona, turns=turns, prompt=prompt, prompt_text=prompt_text,
        prompt_tokens=prompt.tokens if prompt_text == prompt.text else count_tokens(prompt_text),
        candidates=[{"text": t, "new_tokens": count_tokens(t), "hit_stop": True} for t in texts],
        chosen_index=texts.index(chosen),
        created_at=parse_time(record["created_at"]) if "created_at" in record else now(),
    )


def _store(store: Store, pick: _PreparedPick, model_name: str, new_user_persona: str) -> None:
    """Write one prepared pick as the engine writes a live one (call inside the import's transaction)."""
    platform, platform_id = pick.user_id.split(":", 1)
    at = pick.created_at
    store.ensure_user(pick.user_id, platform, platform_id, "", new_user_persona)
    conversation_id = store.add_past_conversation(pick.user_id, pick.persona, started_at=at, ended_at=at)
    turn_ids = [store.add_turn(conversation_id, pick.user_id, turn.role, turn.text, SOURCES[turn.role],
                               created_at=at) for turn in pick.turns]
    set_id = store.add_candidate_set(
        conversation_id=conversation_id, user_id=pick.user_id, user_turn_id=turn_ids[-1], persona=pick.persona,
        prompt=pick.prompt_text, context=pick.prompt.messages, prompt_tokens=pick.prompt_tokens,
        dropped_turns=pick.prompt.dropped_turns, model=model_name, generation=GENERATION, sampling={},
        candidates=pick.candidates, created_at=at,
    )
    store.record_pick(store.candidate_set(set_id), pick.chosen_index, created_at=at)
