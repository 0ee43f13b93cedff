"""Persona cards: who the companion is, how it talks, and how it opens a conversation.

A card is kept as a small TOML file (see FORMAT.md). This module

- reads and checks those files (`load_card`) and writes them back (`dump_card`),
- imports SillyTavern character cards, V1/V2/V3, as JSON or as PNG (`import_card`),
- finds cards by key: built-ins in persona/builtin/, overridden by a user folder (`PersonaLibrary`).

Every problem with a file raises `PersonaError` with a one-line message that names the file.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import tomllib
import zlib
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, Callable

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_NAME_CHARS = 64           # name and user_label: a speaker label on every transcript line
MAX_TEXT_CHARS = 16_000       # description, style, each greeting: every prompt carries them
MAX_EXAMPLE_CHARS = 16_000    # all example dialogues together
NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f:\u2028\u2029]")  # a line break or colon would fake a speaker turn
LANGUAGES = ("ko", "en")
DEFAULT_USER_LABELS = {"ko": "나", "en": "You"}
SPEAKERS = ("user", "char")
KEY_PATTERN = re.compile(r"[a-z0-9_-]+")

_MACRO = re.compile(r"\{\{\s*(char|user)\s*\}\}|<(bot|user)>", re.IGNORECASE)


class PersonaError(Exception):
    """A card could not be read, checked or written; the message names the file and the problem."""


@dataclass
class PersonaCard:
    name: str                                   # the persona's speaker label, e.g. "하루"
    description: str                            # who the persona is
    greetings: list[str]                        # opening messages, at least one
    examples: list[list[tuple[str, str]]]       # example dialogues: turns of ("user" | "char", text)
    style: str = ""                             # tone, speech level, reply length, emoji use
    language: str = "ko"                        # "ko" or "en"
    user_label: str = ""                        # the user's label; "" = default of the language
    key: str = ""                               # short id, e.g. "haru"
    extra: dict = field(default_factory=dict)   # unknown fields, kept verbatim

    def __post_init__(self) -> None:
        self.examples = [[tuple(turn) if isinstance(turn, list) else turn for turn in example]
                         for example in self.examples]

    def user_name(self) -> str:
        return self.user_label or DEFAULT_USER_LABELS.get(self.language, "You")

    def defused(self, fix: Callable[[str], str]) -> "PersonaCard":
        """A copy with `fix` applied to every text the model reads (see bot.prompt.defuse)."""
        return replace(self, name=fix(self.name), description=fix(self.description), style=fix(self.style),
                       user_label=fix(self.user_label), greetings=[fix(g) for g in self.greetings],
                       examples=[[(role, fix(text)) for role, text in example] for example in self.examples])

    def render(self, text: str, user: str | None = None) -> str:
        """Replace {{char}}/<BOT> with the persona's name and {{user}}/<USER> with the user's."""
        user = user or self.user_name()

        def substitute(match: re.Match) -> str:
            who = (match.group(1) or match.group(2)).lower()
            return self.name if who in ("char", "bot") else user

        return _MACRO.sub(substitute, text)


# -- reading files ----------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PersonaError(f"{path}: file is too large ({size / 2**20:.1f} MB; the limit is 20 MB)")
        return path.read_bytes()
    except FileNotFoundError:
        raise PersonaError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PersonaError(f"{path}: is a folder, not a card file") from None
    except OSError as exc:
        raise PersonaError(f"{path}: cannot read the file ({exc.strerror or exc})") from None


def _decode_utf8(raw: bytes, source: str) -> str:
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = bom + exc.start
        raise PersonaError(f"{source}: not valid UTF-8 (byte 0x{raw[offset]:02x} at byte offset {offset}); "
                           "save the file as UTF-8") from None


# -- the TOML card format ---------------------------------------------------------------------------

_FIELDS = ("key", "name", "language", "user_label", "description", "style", "greetings", "examples", "extra")
_TYPE_NAMES = {str: "a string", list: "a list", dict: "a table"}


def load_card(path: str | Path) -> PersonaCard:
    """Read and check a TOML card; `key` defaults to the file name (see `key_from_filename`)."""
    path = Path(path)
    text = _decode_utf8(_read_bytes(path), str(path))
    try:
        data = tomllib.loads(text)
        return _card_from_toml(data, str(path), default_key=key_from_filename(path))
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"{path}: TOML syntax error: {exc}") from None
    except RecursionError:
        raise PersonaError(f"{path}: the card's data is nested too deeply to read") from None


def _card_from_toml(data: dict, source: str, default_key: str) -> PersonaCard:
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise PersonaError(f"{source}: unknown field '{unknown[0]}' (known: {', '.join(_FIELDS)}; "
                           "put custom data under [extra])")

    def get(name: str, kind: type, default: Any = None) -> Any:
        if name not in data:
            if default is None:
                raise PersonaError(f"{source}: missing required field '{name}'")
            return default
        if not isinstance(data[name], kind):
            raise PersonaError(f"{source}: '{name}' must be {_TYPE_NAMES[kind]}, not {_toml_type(data[name])}")
        return data[name]

    examples = []
    for number, example in enumerate(get("examples", list, []), 1):
        if not isinstance(example, dict) or set(example) != {"turns"} or not isinstance(example["turns"], list):
            raise PersonaError(f"{source}: example {number} must be a table with just 'turns', "
                               "a list of [speaker, text] pairs")
        examples.append(example["turns"])
    card = PersonaCard(name=get("name", str), description=get("description", str),
                       greetings=get("greetings", list), examples=examples, style=get("style", str, ""),
                       language=get("language", str, "ko"), user_label=get("user_label", str, ""),
                       key=get("key", str, default_key), extra=get("extra", dict, {}))
    check_card(card, source)
    return card


def check_card(card: PersonaCard, source: str) -> None:
    """Raise PersonaError for the first problem found in `card`."""
    for name in ("name", "description", "style", "language", "user_label", "key"):
        value = getattr(card, name)
        if not isinstance(value, str):
            raise PersonaError(f"{source}: '{name}' must be a string, not {_toml_type(value)}")
    for name in ("name", "description"):
        if not getattr(card, name).strip():
            raise PersonaError(f"{source}: '{name}' is empty")
    for name in ("name", "user_label"):
        value = getattr(card, name)
        if len(value) > MAX_NAME_CHARS:
            raise PersonaError(f"{source}: '{name}' is {len(value)} characters long (at most {MAX_NAME_CHARS})")
        if NAME_FORBIDDEN.search(value):
            raise PersonaError(f"{source}: '{name}' may not contain a line break, a control character or ':' "
                               "(it labels a speaker on each line of the transcript)")
    for name in ("description", "style"):
        if len(getattr(card, name)) > MAX_TEXT_CHARS:
            raise PersonaError(f"{source}: '{name}' is {len(getattr(card, name)):,} characters long "
                               f"(at most {MAX_TEXT_CHARS:,}: every prompt carries it)")
    if card.language not in LANGUAGES:
        raise PersonaError(f"{source}: 'language' must be one of {', '.join(LANGUAGES)}, not '{card.language}'")
    if card.key and not KEY_PATTERN.fullmatch(card.key):
        raise PersonaError(f"{source}: 'key' may only use lowercase letters a-z, digits, '-' and '_' "
                           f"(got '{card.key}')")
    if not isinstance(card.greetings, list) or not card.greetings:
        raise PersonaError(f"{source}: 'greetings' needs at least one greeting")
    for number, greeting in enumerate(card.greetings, 1):
        if not isinstance(greeting, str) or not greeting.strip():
            raise PersonaError(f"{source}: greeting {number} must be a non-empty string")
        if len(greeting) > MAX_TEXT_CHARS:
            raise PersonaError(f"{source}: greeting {number} is {len(greeting):,} characters long "
                               f"(at most {MAX_TEXT_CHARS:,})")
    for number, example in enumerate(card.examples, 1):
        if not example:
            raise PersonaError(f"{source}: example {number} has no turns")
        for turn_number, turn in enumerate(example, 1):
            where = f"{source}: example {number}, turn {turn_number}"
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise PersonaError(f"{where}: a turn is a pair [speaker, text]")
            speaker, text = turn
            if speaker not in SPEAKERS:
                raise PersonaError(f"{where}: speaker must be \"user\" or \"char\", not {speaker!r}")
            if not isinstance(text, str) or not text.strip():
                raise PersonaError(f"{where}: text must be a non-empty string")
    if sum(len(text) for example in card.examples for _, text in example) > MAX_EXAMPLE_CHARS:
        raise PersonaError(f"{source}: the example dialogues are longer than {MAX_EXAMPLE_CHARS:,} characters "
                           "together (every prompt carries them)")
    if not isinstance(card.extra, dict):
        raise PersonaError(f"{source}: 'extra' must be a table, not {_toml_type(card.extra)}")


def _toml_type(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             tuple: "a list", dict: "a table"}
    return names.get(type(value), type(value).__name__)


# -- writing TOML -----------------------------------------------------------------------------------

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dump_card(card: PersonaCard) -> str:
    """The card as TOML text that `load_card` reads back to an equal card."""
    check_card(card, f"card '{card.key or card.name}'")
    lines = [f"key = {_string(card.key)}"] if card.key else []
    lines += [f"name = {_string(card.name)}", f"language = {_string(card.language)}"]
    if card.user_label:
        lines.append(f"user_label = {_string(card.user_label)}")
    lines.append(f"description = {_text(card.description)}")
    if card.style:
        lines.append(f"style = {_text(card.style)}")
    lines += ["greetings = [", *(f"  {_string(g)}," for g in card.greetings), "]"]
    for example in card.examples:
        lines += ["", "[[examples]]", "turns = ["]
        lines += [f"  [{_string(speaker)}, {_string(text)}]," for speaker, text in example]
        lines.append("]")
    if card.extra:
        lines += ["", "[extra]"]
        _write_table(lines, ["extra"], card.extra)
    return "\n".join(lines) + "\n"


def _string(text: str) -> str:
    """A one-line TOML basic string."""
    return '"' + "".join(_escape(c, multiline=False) for c in text) + '"'


def _text(text: str) -> str:
    """A TOML string; a multi-line basic string when the text has line breaks."""
    if "\n" not in text:
        return _string(text)
    body = "".join(_escape(c, multiline=True) for c in text)
    body = re.sub(r'"(?="|\Z)', r'\\"', body)  # no three quotes in a row, none right before the closing """
    return '"""\n' + body + '"""'


def _escape(c: str, multiline: bool) -> str:
    if multiline and c in '\t\n"':
        return c
    if c in _ESCAPES:
        return _ESCAPES[c]
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise PersonaError(f"extra: table keys must be strings, not {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _write_table(lines: list[str], path: list[str], table: dict) -> None:
    """Write a table's plain values, then its sub-tables ([a.b]) and arrays of tables ([[a.b]])."""
    nested = []
    for key, value in table.items():
        is_table_array = isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)
        if (isinstance(value, dict) and value) or is_table_array:
            nested.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_text(value) if isinstance(value, str) else _value(value, key)}")
    for key, value in nested:
        name = ".".join(_key(part) for part in path + [key])
        for item in [value] if isinstance(value, dict) else value:
            lines += ["", f"[{name}]" if isinstance(value, dict) else f"[[{name}]]"]
            _write_table(lines, path + [key], item)


def _value(value: Any, where: str) -> str:
    """An inline (one-line) TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else repr(value)  # repr gives 1.5, 1e-05, inf, -inf
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item, where) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v, f'{where}.{k}')}" for k, v in value.items()) + "}"
    raise PersonaError(f"extra: cannot write the {type(value).__name__} value of '{where}' as TOML")


# -- SillyTavern character cards --------------------------------------------------------------------

_TEXT_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example", "system_prompt",
                "post_history_instructions")
_MAPPED = (*_TEXT_FIELDS, "alternate_greetings")  # what becomes card fields; everything else goes to extra
_LABELS = {"ko": ("성격", "상황"), "en": ("Personality", "Scenario")}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def import_card(path: str | Path) -> PersonaCard:
    """Read a SillyTavern character card (V1, V2 or V3; JSON or PNG) as a persona card."""
    try:
        return _import_card(Path(path))
    except RecursionError:
        raise PersonaError(f"{path}: the card's data is nested too deeply to read") from None


def _import_card(path: Path) -> PersonaCard:
    raw = _read_bytes(path)
    if raw.startswith(_PNG_SIGNATURE):
        chunks = _png_text_chunks(raw, str(path))
        keyword = "ccv3" if "ccv3" in chunks else "chara"
        if keyword not in chunks:
            raise PersonaError(f"{path}: PNG has no character data (no 'chara' or 'ccv3' text chunk)")
        data = _chunk_json(chunks[keyword], f"{path} ('{keyword}' chunk)")
    else:
        data = _parse_json(_decode_utf8(raw, str(path)), str(path))
    return _card_from_sillytavern(data, str(path), key=key_from_filename(path))


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonaError(f"{source}: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def _chunk_json(value: str, source: str) -> Any:
    """The JSON in a card chunk: base64 of UTF-8 JSON (plain JSON is accepted too)."""
    value = value.strip()
    if value.startswith("{"):
        return _parse_json(value, source)
    packed = "".join(value.split())
    try:
        raw = base64.b64decode(packed + "=" * (-len(packed) % 4), validate=True)
    except ValueError:
        raise PersonaError(f"{source}: chunk is not valid base64") from None
    return _parse_json(_decode_utf8(raw, source), source)


def _png_text_chunks(data: bytes, source: str) -> dict[str, str]:
    """The 'chara' and 'ccv3' text chunks (tEXt, zTXt or iTXt) of a PNG file, by lowercase keyword."""
    found: dict[str, str] = {}
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += length + 12  # length, type, body, CRC
        if kind == b"IEND":
            break
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        keyword, _, rest = body.partition(b"\0")
        keyword = keyword.decode("latin-1").lower()
        if keyword not in ("chara", "ccv3") or keyword in found:
            continue
        try:
            if kind == b"tEXt":
                found[keyword] = rest.decode("latin-1")
            elif kind == b"zTXt":
                found[keyword] = _inflate(rest[1:]).decode("latin-1")
            else:  # iTXt: compression flag, method, language tag, translated keyword, text
                compressed, rest = rest[:1] == b"\1", rest[2:]
                text = rest.split(b"\0", 2)[-1]
                found[keyword] = (_inflate(text) if compressed else text).decode("utf-8")
        except (zlib.error, UnicodeDecodeError, ValueError) as exc:
            raise PersonaError(f"{source}: unreadable '{keyword}' chunk ({exc})") from None
    return found


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, MAX_FILE_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError("more than 20 MB when decompressed")
    return out


def _card_from_sillytavern(data: Any, source: str, key: str) -> PersonaCard:
    if not isinstance(data, dict):
        raise PersonaError(f"{source}: a character card must be a JSON object, not {_json_type(data)}")
    data = _drop_nulls(data)
    if isinstance(data.get("data"), dict):  # V2/V3: the card is under "data"
        fields = data["data"]
        extra = {k: v for k, v in fields.items() if k not in _MAPPED}
        # the wrapper: spec, spec_version, and whatever else is there (minus copies of the data fields)
        wrapper = {k: v for k, v in data.items() if k != "data" and fields.get(k, object()) != v}
        extra.update({k: wrapper.pop(k) for k in ("spec", "spec_version") if k in wrapper})
        if wrapper:
            extra["top_level"] = wrapper
    else:  # V1: flat
        fields = data
        extra = {k: v for k, v in fields.items() if k not in _MAPPED}

    alternates = fields.get("alternate_greetings", [])
    if not isinstance(alternates, list) or not all(isinstance(g, str) for g in alternates):
        raise PersonaError(f"{source}: 'alternate_greetings' must be a list of strings")
    text = {}
    for name in _TEXT_FIELDS:
        value = fields.get(name, "")
        if not isinstance(value, str):
            raise PersonaError(f"{source}: '{name}' must be a string, not {_json_type(value)}")
        text[name] = _tidy(value)
    if not text["name"]:
        raise PersonaError(f"{source}: the card has no name")
    greetings = [g for g in [text["first_mes"], *map(_tidy, alternates)] if g]
    if not greetings:
        raise PersonaError(f"{source}: the card has no greeting (first_mes)")

    language = _detect_language(" ".join([text["description"], text["personality"], text["scenario"], *greetings]))
    labels = dict(zip(("personality", "scenario"), _LABELS[language]))
    paragraphs = [text["description"]] + [f"{labels[n]}: {text[n]}" for n in labels if text[n]]
    description = "\n\n".join(p for p in paragraphs if p)
    if not description:
        raise PersonaError(f"{source}: the card has no description, personality or scenario")
    notes = [re.sub(r"\{\{original\}\}", "", text[n], flags=re.I).strip()
             for n in ("system_prompt", "post_history_instructions")]
    card = PersonaCard(name=text["name"], description=description, greetings=greetings,
                       examples=_parse_examples(text["mes_example"], text["name"]),
                       style="\n\n".join(n for n in notes if n), language=language, key=key, extra=extra)
    check_card(card, source)
    return card


def _tidy(text: str) -> str:
    return text.replace("\r\n", "\n").strip()


def _parse_examples(text: str, char_name: str) -> list[list[tuple[str, str]]]:
    """SillyTavern example messages: blocks split on <START>, turns "{{user}}: ..." / "{{char}}: ..."."""
    user_labels = {"{{user}}", "<user>", "user", "you", "나"}
    char_labels = {"{{char}}", "<bot>", char_name.lower()}
    examples = []
    for block in re.split(r"<start>", text, flags=re.IGNORECASE):
        turns: list[list[str]] = []
        for line in block.splitlines():
            label, colon, said = line.partition(":")
            label = label.strip().lower()
            if colon and label in user_labels | char_labels:
                turns.append(["user" if label in user_labels else "char", said.strip()])
            elif turns:  # a continuation line belongs to the turn before it
                turns[-1][1] += "\n" + line.rstrip()
        example = [(speaker, said.strip()) for speaker, said in turns if said.strip()]
        if example:
            examples.append(example)
    return examples


def _detect_language(text: str) -> str:
    """"ko" when Hangul makes up a sizeable share (a quarter or more) of the letters, else "en"."""
    text = _MACRO.sub("", text)
    letters = [c for c in text if c.isalpha()]
    hangul = sum(1 for c in letters if "\uac00" <= c <= "\ud7a3" or "\u1100" <= c <= "\u11ff"
                 or "\u3130" <= c <= "\u318f")
    return "ko" if letters and hangul / len(letters) >= 0.25 else "en"


def _drop_nulls(value: Any) -> Any:
    """JSON null has no TOML form; an unset field is simply left out."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value if v is not None]
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def key_from_filename(path: Path) -> str:
    """'Luna Card (v2).png' -> 'luna-card-v2': lowercase a-z, digits, '-' and '_'; 'card' if nothing is left."""
    return re.sub(r"[^a-z0-9_-]+", "-", path.stem.lower()).strip("-_") or "card"


# -- the library ------------------------------------------------------------------------------------


def builtin_cards_dir() -> Path:
    return Path(__file__).resolve().parent / "builtin"


class PersonaLibrary:
    """Built-in cards plus the *.toml cards of a user folder, which override built-ins of the same key.

    In a library the file name decides the key (haru.toml -> "haru"). A card is parsed again only
    when its file changed, so an edited file takes effect at once and a broken one only fails when
    it is asked for.
    """

    DEFAULT_KEY = "haru"

    def __init__(self, user_dir: Path | None = None) -> None:
        self.user_dir = Path(user_dir).expanduser() if user_dir is not None else None
        self._parsed: dict[Path, tuple[int, PersonaCard]] = {}  # path -> (mtime_ns, card)

    def _paths(self) -> dict[str, Path]:
        folders = [builtin_cards_dir()] + ([self.user_dir] if self.user_dir and self.user_dir.is_dir() else [])
        return {key_from_filename(p): p for folder in folders for p in sorted(folder.glob("*.toml"))
                if not p.name.startswith(".")}

    def keys(self) -> list[str]:
        return sorted(self._paths())

    def get(self, key: str) -> PersonaCard:
        paths = self._paths()
        if key not in paths:
            raise PersonaError(f"unknown persona '{key}'; available: {', '.join(sorted(paths))}")
        path = paths[key]
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = -1  # vanished meanwhile: load_card says so
        cached = self._parsed.get(path)
        if cached is None or cached[0] != stamp:
            card = load_card(path)
            card.key = key
            self._parsed[path] = cached = (stamp, card)
        return cached[1]

    def save(self, card: PersonaCard) -> Path:
        if self.user_dir is None:
            raise PersonaError("cannot save persona: no folder for user personas is configured")
        if not KEY_PATTERN.fullmatch(card.key or ""):
            raise PersonaError(f"cannot save persona '{card.name}': key '{card.key}' may only use "
                               "lowercase letters a-z, digits, '-' and '_'")
        text = dump_card(card)
        path = self.user_dir / f"{card.key}.toml"
        try:
            self.user_dir.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(text, encoding="utf-8")
            temporary.replace(path)
        except OSError as exc:
            raise PersonaError(f"{path}: cannot write the file ({exc.strerror or exc})") from None
        return path
