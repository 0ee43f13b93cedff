"""SQLite storage through sqlite-utils: one file, WAL mode, schema migrated by `PRAGMA user_version`.

Tables (every pick can later be turned into a (context, chosen, rejected) record without guessing):

    users            one row per platform user ("discord:123", "telegram:456", "console:local")
    conversations    a user's conversations; the active one has ended_at NULL
    turns            what was said: user messages, greetings and picked replies only
    candidate_sets   one per generation request: the exact prompt, sampling settings, model generation
    candidates       the N sampled replies of a set, each with the settings and generation that made it, the
                     scorer's signals and rank, and whether it was shown (only the best K are offered)
    picks            which candidate the user chose (at most one per set)
    reactions        thumbs up/down on single replies
    generations      trained LoRA generations with their gate metrics (written by the nightly rollover)
    serving          per lineage, the generation being served (no row or NULL: the base model)
    rollover_runs    when each nightly rollover ran and how it ended
    rankers          per user, the weights of the ranker their picks taught (bot/ranking.py)
    platform_messages  the chat-platform message that shows a candidate set
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import sqlite_utils

from bot.generations import ADAPTER_ERROR, GENERATION_FLOOR, adapter_name

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_user_id TEXT NOT NULL,
        display_name TEXT NOT NULL DEFAULT '',
        persona TEXT NOT NULL,
        language TEXT,
        learning_opt_out INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id),
        persona TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT
    );
    CREATE INDEX conversations_user ON conversations(user_id, ended_at);
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        user_id TEXT NOT NULL REFERENCES users(id),
        role TEXT NOT NULL CHECK (role IN ('user', 'char')),
        text TEXT NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('typed', 'greeting', 'picked')),
        candidate_set_id TEXT REFERENCES candidate_sets(id),
        candidate_id INTEGER REFERENCES candidates(id),
        created_at TEXT NOT NULL
    );
    CREATE INDEX turns_conversation ON turns(conversation_id, id);
    CREATE TABLE candidate_sets (
        id TEXT PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id),
        user_id TEXT NOT NULL REFERENCES users(id),
        user_turn_id INTEGER NOT NULL REFERENCES turns(id),
        persona TEXT NOT NULL,
        prompt TEXT NOT NULL,
        context_json TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        dropped_turns INTEGER NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        generation TEXT NOT NULL,
        sampling_json TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'open'
            CHECK (status IN ('open', 'picked', 'skipped', 'regenerated', 'reset')),
        created_at TEXT NOT NULL,
        closed_at TEXT
    );
    CREATE INDEX candidate_sets_user ON candidate_sets(user_id, status);
    CREATE TABLE candidates (
        id INTEGER PRIMARY KEY,
        set_id TEXT NOT NULL REFERENCES candidate_sets(id),
        idx INTEGER NOT NULL,
        text TEXT NOT NULL,
        model TEXT NOT NULL,
        generation TEXT NOT NULL,
        sampling_json TEXT NOT NULL,
        new_tokens INTEGER NOT NULL,
        hit_stop INTEGER NOT NULL,
        UNIQUE (set_id, idx)
    );
    CREATE TABLE picks (
        id INTEGER PRIMARY KEY,
        set_id TEXT NOT NULL UNIQUE REFERENCES candidate_sets(id),
        candidate_id INTEGER NOT NULL REFERENCES candidates(id),
        user_id TEXT NOT NULL REFERENCES users(id),
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        auto INTEGER NOT NULL DEFAULT 0,  -- 1: the only distinct candidate, taken without asking
        created_at TEXT NOT NULL
    );
    CREATE TABLE reactions (
        id INTEGER PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(id),
        turn_id INTEGER NOT NULL REFERENCES turns(id),
        value INTEGER NOT NULL CHECK (value IN (-1, 1)),
        emoji TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        UNIQUE (user_id, turn_id)
    );
    CREATE TABLE generations (
        id INTEGER PRIMARY KEY,
        lineage TEXT NOT NULL,
        number INTEGER NOT NULL,
        path TEXT NOT NULL,
        parent_id INTEGER REFERENCES generations(id),
        status TEXT NOT NULL,
        metrics_json TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        UNIQUE (lineage, number)
    );
    """,
    # 2: generations record the data they were trained on and why the gate decided; each lineage has
    #    one pointer to the generation it serves, changed in one transaction
    """
    ALTER TABLE generations ADD COLUMN last_pick_id INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE generations ADD COLUMN reason TEXT NOT NULL DEFAULT '';
    CREATE TABLE serving (
        lineage TEXT PRIMARY KEY,
        generation_id INTEGER REFERENCES generations(id),
        updated_at TEXT NOT NULL
    );
    CREATE TABLE rollover_runs (
        id INTEGER PRIMARY KEY,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        status TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT ''
    );
    """,
    # 3: which platform message shows which candidate set (reactions and buttons name the message)
    """
    CREATE TABLE platform_messages (
        platform TEXT NOT NULL,
        message_id TEXT NOT NULL,
        set_id TEXT NOT NULL REFERENCES candidate_sets(id),
        PRIMARY KEY (platform, message_id)
    );
    """,
    # 4: switches an admin can flip at run time (e.g. learning paused)
    """
    CREATE TABLE flags (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 5: a conversation belongs to a user in one chat ('' their private chat, else a group or channel
    #    id), so a group never sees DM history; exports find a conversation's candidate sets by index
    """
    ALTER TABLE conversations ADD COLUMN chat TEXT NOT NULL DEFAULT '';
    CREATE INDEX conversations_user_chat ON conversations(user_id, chat, ended_at);
    CREATE INDEX candidate_sets_conversation ON candidate_sets(conversation_id, created_at);
    """,
    # 6: a night's progress, for admins while it runs: where its jobs run, how many lineages it trains,
    #    how many are done (failed ones included), failed, and tried again
    """
    ALTER TABLE rollover_runs ADD COLUMN executor TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE rollover_runs ADD COLUMN lineages_total INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rollover_runs ADD COLUMN lineages_done INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rollover_runs ADD COLUMN lineages_failed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE rollover_runs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: best-of-N offers: every sampled candidate is kept with the scorer's signals and its rank, and
    #    says whether it was shown (shown ones are numbered idx 0..K-1 as offered, the rest follow) or
    #    pruned (dropped after its opening: a partial reply); each user's ranker weights
    """
    ALTER TABLE candidates ADD COLUMN shown INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE candidates ADD COLUMN ranked INTEGER;
    ALTER TABLE candidates ADD COLUMN score REAL;
    ALTER TABLE candidates ADD COLUMN logprob REAL;
    ALTER TABLE candidates ADD COLUMN relevance REAL;
    ALTER TABLE candidates ADD COLUMN state BLOB;
    ALTER TABLE candidates ADD COLUMN pruned INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE rankers (
        user_id TEXT PRIMARY KEY REFERENCES users(id),
        weights_json TEXT NOT NULL,
        picks INTEGER NOT NULL,
        updated_at TEXT NOT NULL
    );
    """,
]

CLOSED_STATUSES = ("picked", "skipped", "regenerated", "reset")


class StoreError(Exception):
    """The database cannot be used (newer schema, unreadable file)."""


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents readable by this user only (0700); folders that already
    exist keep their mode (a database in /tmp must not change /tmp)."""
    if not path.exists():
        private_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
        path.chmod(0o700)
    return path


def private_file(path: Path) -> None:
    """Create `path` if missing, and make it readable by this user only (0600)."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    path.chmod(0o600)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_set_id() -> str:
    return secrets.token_hex(6)


class Store:
    """All reads and writes of the SQLite file. Methods are small and each write is one transaction."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if str(path) != ":memory:":
            private_dir(self.path.parent)
            private_file(self.path)  # SQLite gives new -wal and -shm files the database file's mode
            for side in (self.path.with_name(self.path.name + "-wal"), self.path.with_name(self.path.name + "-shm")):
                if side.exists():  # left by an earlier version with a looser mode
                    side.chmod(0o600)
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
            self._lock = threading.RLock()
            self.db = _ThreadSafeDatabase(conn, self._lock)
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA secure_delete = ON")  # deleted text is overwritten, not left in free pages
            if str(path) != ":memory:":
                self.db.enable_wal()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None

    def close(self) -> None:
        self.db.conn.close()

    # -- schema ---------------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise StoreError(f"database {self.path} has schema {version}, newer than this Banryeo ({len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {number}")

    def transaction(self):
        return _Transaction(self)

    # -- users and conversations ----------------------------------------------------------------

    def user(self, user_id: str) -> dict | None:
        return self._one("SELECT * FROM users WHERE id = ?", user_id)

    def ensure_user(self, user_id: str, platform: str, platform_user_id: str, display_name: str, persona: str) -> dict:
        with self.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO users (id, platform, platform_user_id, display_name, persona, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [user_id, platform, platform_user_id, display_name, persona, now()],
            )
            if display_name:
                self.db.execute("UPDATE users SET display_name = ? WHERE id = ?", [display_name, user_id])
        return self.user(user_id)

    def update_user(self, user_id: str, **fields: Any) -> None:
        with self.transaction():
            self.db["users"].update(user_id, fields)

    def active_conversation(self, user_id: str, chat: str = "") -> dict | None:
        """The user's current conversation in `chat` ('' their private chat, else a group's id)."""
        return self._one("SELECT * FROM conversations WHERE user_id = ? AND chat = ? AND ended_at IS NULL "
                         "ORDER BY id DESC LIMIT 1", user_id, chat)

    def start_conversation(self, user_id: str, persona: str, greeting: str, chat: str = "") -> int:
        """End the active conversation in `chat` (closing its open sets) and start a new one with a greeting."""
        with self.transaction():
            self.close_open_sets(user_id, "reset", chat)
            self.db.execute("UPDATE conversations SET ended_at = ? WHERE user_id = ? AND chat = ? AND ended_at IS NULL",
                            [now(), user_id, chat])
            conversation_id = self.db["conversations"].insert(
                {"user_id": user_id, "persona": persona, "started_at": now(), "ended_at": None, "chat": chat}).last_pk
            self.add_turn(conversation_id, user_id, "char", greeting, "greeting")
        return conversation_id

    def add_past_conversation(self, user_id: str, persona: str, started_at: str, ended_at: str) -> int:
        """A conversation that is already over (imported history); the user's active one is left alone."""
        with self.transaction():
            return self.db["conversations"].insert(
                {"user_id": user_id, "persona": persona, "started_at": started_at, "ended_at": ended_at}).last_pk

    # -- turns ----------------------------------------------------------------------------------

    def add_turn(self, conversation_id: int, user_id: str, role: str, text: str, source: str,
                 candidate_set_id: str | None = None, candidate_id: int | None = None,
                 created_at: str | None = None) -> int:
        with self.transaction():
            return self.db["turns"].insert({
                "conversation_id": conversation_id, "user_id": user_id, "role": role, "text": text,
                "source": source, "candidate_set_id": candidate_set_id, "candidate_id": candidate_id,
                "created_at": created_at or now(),
            }).last_pk

    def turns(self, conversation_id: int) -> list[dict]:
        return list(self.db.query("SELECT * FROM turns WHERE conversation_id = ? ORDER BY id", [conversation_id]))

    def turn(self, turn_id: int) -> dict | None:
        return self._one("SELECT * FROM turns WHERE id = ?", turn_id)

    # -- candidate sets and picks ---------------------------------------------------------------

    def add_candidate_set(self, *, conversation_id: int, user_id: str, user_turn_id: int, persona: str,
                          prompt: str, context: list[dict], prompt_tokens: int, dropped_turns: int, model: str,
                          generation: str, sampling: dict, candidates: list[dict],
                          created_at: str | None = None) -> str:
        """Store a set and its candidates (dicts with text, new_tokens, hit_stop, and optionally shown,
        ranked, score, logprob, relevance, state, pruned); returns the set id. Shown candidates come first, in
        the order they are offered.

        `created_at` is for imported picks (see bot/picks_import.py); live sets are stamped now.
        """
        set_id = new_set_id()
        sampling_json = json.dumps(sampling, sort_keys=True)
        with self.transaction():
            self.db["candidate_sets"].insert({
                "id": set_id, "conversation_id": conversation_id, "user_id": user_id, "user_turn_id": user_turn_id,
                "persona": persona, "prompt": prompt, "context_json": json.dumps(context, ensure_ascii=False),
                "prompt_tokens": prompt_tokens, "dropped_turns": dropped_turns, "model": model,
                "generation": generation, "sampling_json": sampling_json, "status": "open",
                "created_at": created_at or now(),
                "closed_at": None,
            })
            self.db["candidates"].insert_all({
                "set_id": set_id, "idx": idx, "text": c["text"], "model": model, "generation": generation,
                "sampling_json": sampling_json, "new_tokens": c["new_tokens"], "hit_stop": int(c["hit_stop"]),
                "shown": int(c.get("shown", True)), "ranked": c.get("ranked"), "score": c.get("score"),
                "logprob": c.get("logprob"), "relevance": c.get("relevance"), "state": c.get("state"),
                "pruned": int(c.get("pruned", False)),
            } for idx, c in enumerate(candidates))
        return set_id

    def candidate_set(self, set_id: str) -> dict | None:
        """The set with `candidates` (those offered, in their numbered order) and `unshown` (sampled, ranked
        lower, never offered; `pruned` ones are partial replies dropped after their opening)."""
        row = self._one("SELECT * FROM candidate_sets WHERE id = ?", set_id)
        if row is not None:
            every = list(self.db.query("SELECT * FROM candidates WHERE set_id = ? ORDER BY idx", [set_id]))
            row["candidates"] = [c for c in every if c["shown"]]
            row["unshown"] = [c for c in every if not c["shown"]]
        return row

    def open_set(self, user_id: str, chat: str = "") -> dict | None:
        row = self._one("SELECT s.id FROM candidate_sets s JOIN conversations c ON c.id = s.conversation_id "
                        "WHERE s.user_id = ? AND c.chat = ? AND s.status = 'open' ORDER BY s.created_at DESC LIMIT 1",
                        user_id, chat)
        return self.candidate_set(row["id"]) if row else None

    def close_open_sets(self, user_id: str, status: str, chat: str = "") -> int:
        """Close the user's open offers in `chat` (another chat's offer stays open there)."""
        assert status in CLOSED_STATUSES
        with self.transaction():
            return self.db.execute("UPDATE candidate_sets SET status = ?, closed_at = ? WHERE user_id = ? "
                                   "AND status = 'open' AND conversation_id IN "
                                   "(SELECT id FROM conversations WHERE user_id = ? AND chat = ?)",
                                   [status, now(), user_id, user_id, chat]).rowcount

    def pick_of(self, set_id: str) -> dict | None:
        return self._one("SELECT picks.*, candidates.idx AS idx, candidates.text AS text FROM picks "
                         "JOIN candidates ON candidates.id = picks.candidate_id WHERE picks.set_id = ?", set_id)

    def record_pick(self, set_row: dict, index: int, auto: bool = False, created_at: str | None = None) -> int:
        """Atomically: the picked reply becomes a turn, the pick is stored, the set is closed. Returns the turn id.

        Raises sqlite3.IntegrityError when the set was already picked (the UNIQUE constraint is the last guard).
        `created_at` is for imported picks; live picks are stamped now.
        """
        candidate = set_row["candidates"][index]
        at = created_at or now()
        with self.transaction():
            turn_id = self.add_turn(set_row["conversation_id"], set_row["user_id"], "char", candidate["text"],
                                    "picked", set_row["id"], candidate["id"], created_at=at)
            self.db["picks"].insert({"set_id": set_row["id"], "candidate_id": candidate["id"],
                                     "user_id": set_row["user_id"], "turn_id": turn_id, "auto": int(auto),
                                     "created_at": at})
            updated = self.db.execute("UPDATE candidate_sets SET status = 'picked', closed_at = ? "
                                      "WHERE id = ? AND status = 'open'", [at, set_row["id"]]).rowcount
            if updated != 1:
                raise sqlite3.IntegrityError(f"candidate set {set_row['id']} is no longer open")
        return turn_id

    def link_message(self, platform: str, message_id: str, set_id: str) -> None:
        with self.transaction():
            self.db["platform_messages"].insert({"platform": platform, "message_id": message_id, "set_id": set_id},
                                                replace=True)

    def set_for_message(self, platform: str, message_id: str) -> str | None:
        row = self._one("SELECT set_id FROM platform_messages WHERE platform = ? AND message_id = ?",
                        platform, message_id)
        return row["set_id"] if row else None

    # -- backups ----------------------------------------------------------------------------------

    def backup(self, target: Path) -> None:
        """A consistent copy of the database while it is in use (SQLite's online backup API)."""
        private_dir(target.parent)
        private_file(target)
        copy = sqlite3.connect(str(target))
        try:
            with self._lock:
                self.db.conn.backup(copy)
        finally:
            copy.close()

    # -- flags ------------------------------------------------------------------------------------

    def flag(self, name: str) -> str | None:
        row = self._one("SELECT value FROM flags WHERE name = ?", name)
        return row["value"] if row else None

    def set_flag(self, name: str, value: str | None) -> None:
        with self.transaction():
            if value is None:
                self.db.execute("DELETE FROM flags WHERE name = ?", [name])
            else:
                self.db["flags"].upsert({"name": name, "value": value}, pk="name")

    # -- a user's own data ----------------------------------------------------------------------

    def export_user(self, user_id: str) -> dict:
        """Everything stored about one user (format: README, 'Your data')."""
        user = self.user(user_id)
        if user is None:
            return {"format": "banryeo-export-1", "user": None, "conversations": []}
        conversations = []
        for conversation in self.db.query("SELECT * FROM conversations WHERE user_id = ? ORDER BY id", [user_id]):
            sets = []
            for row in self.db.query("SELECT id FROM candidate_sets WHERE conversation_id = ? ORDER BY created_at",
                                     [conversation["id"]]):
                offer = self.candidate_set(row["id"])
                pick = self.pick_of(row["id"])
                sets.append({"id": offer["id"], "created_at": offer["created_at"], "status": offer["status"],
                             "generation": offer["generation"], "candidates": [c["text"] for c in offer["candidates"]],
                             "not_shown": [c["text"] for c in offer["unshown"] if not c["pruned"]],
                             "pruned": [c["text"] for c in offer["unshown"] if c["pruned"]],
                             "picked": pick["idx"] if pick else None})
            turns = [{"role": t["role"], "text": t["text"], "source": t["source"], "at": t["created_at"]}
                     for t in self.turns(conversation["id"])]
            conversations.append({"id": conversation["id"], "persona": conversation["persona"], "chat": conversation["chat"],
                                  "started_at": conversation["started_at"], "ended_at": conversation["ended_at"],
                                  "turns": turns, "candidate_sets": sets})
        reactions = list(self.db.query("SELECT turn_id, value, emoji, created_at FROM reactions WHERE user_id = ?",
                                       [user_id]))
        ranker = self._one("SELECT weights_json, picks, updated_at FROM rankers WHERE user_id = ?", user_id)
        return {"format": "banryeo-export-1", "user": user, "conversations": conversations, "reactions": reactions,
                "ranker": ranker and {"weights": json.loads(ranker["weights_json"]), "picks": ranker["picks"],
                                      "updated_at": ranker["updated_at"]}}

    def forget_user(self, user_id: str) -> None:
        """Delete every row of one user, and their lineage's entries in rollover summaries, in one
        transaction; then truncate the WAL so the deleted text is not left in it."""
        sets = "SELECT id FROM candidate_sets WHERE user_id = ?"
        with self.transaction():
            for sql in (f"DELETE FROM platform_messages WHERE set_id IN ({sets})",
                        "DELETE FROM picks WHERE user_id = ?",
                        "DELETE FROM reactions WHERE user_id = ?",
                        "DELETE FROM rankers WHERE user_id = ?",
                        "UPDATE turns SET candidate_set_id = NULL, candidate_id = NULL WHERE user_id = ?",
                        f"DELETE FROM candidates WHERE set_id IN ({sets})",
                        "DELETE FROM candidate_sets WHERE user_id = ?",
                        "DELETE FROM turns WHERE user_id = ?",
                        "DELETE FROM conversations WHERE user_id = ?",
                        "DELETE FROM users WHERE id = ?"):
                self.db.execute(sql, [user_id])
            self._edit_summaries(lambda outcome: None if outcome.get("lineage") == user_id else outcome)
        self.checkpoint()

    def forget_lineage(self, lineage: str) -> None:
        """Delete a lineage's generation rows, serving pointer and adapter-error flags (its folder is
        removed by bot.generations.forget_generations). The highest number it reached is kept (without
        saying whose) in the flag `generation_floor`: a lineage with no generations numbers its first
        above it, so a served name never stands for two different weights, not even after a forget."""
        generations = self.generations(lineage)
        with self.transaction():
            floor = max([int(self.flag(GENERATION_FLOOR) or 0)] + [g["number"] for g in generations])
            self.set_flag(GENERATION_FLOOR, str(floor))
            self.db.execute("DELETE FROM serving WHERE lineage = ?", [lineage])
            self.db.execute("UPDATE generations SET parent_id = NULL WHERE lineage = ?", [lineage])
            self.db.execute("DELETE FROM generations WHERE lineage = ?", [lineage])
            for generation in generations:
                self.db.execute("DELETE FROM flags WHERE name = ?", [ADAPTER_ERROR + adapter_name(generation)])
        self.checkpoint()

    def drop_examples(self, lineage: str) -> None:
        """Remove the sampled example replies kept in a lineage's generation rows and rollover summaries
        (a shared lineage's samples may continue a forgotten user's conversations)."""
        with self.transaction():
            for generation in self.generations(lineage):
                metrics = {k: v for k, v in generation["metrics"].items() if k != "examples"}
                self.db.execute("UPDATE generations SET metrics_json = ? WHERE id = ?",
                                [json.dumps(metrics, sort_keys=True), generation["id"]])
            self._edit_summaries(lambda outcome: {**outcome, "metrics": {
                k: v for k, v in (outcome.get("metrics") or {}).items() if k != "examples"}}
                if outcome.get("lineage") == lineage else outcome)
        self.checkpoint()

    def _edit_summaries(self, edit) -> None:
        """Rewrite every rollover run's summary, outcome by outcome (`edit` returns None to drop one)."""
        for run in list(self.db.query("SELECT id, summary FROM rollover_runs WHERE summary != ''")):
            try:
                outcomes = json.loads(run["summary"])
            except ValueError:
                outcomes = []
            kept = [o for o in (edit(o) for o in outcomes if isinstance(o, dict)) if o is not None]
            if kept != outcomes:
                self.db.execute("UPDATE rollover_runs SET summary = ? WHERE id = ?",
                                [json.dumps(kept, ensure_ascii=False, default=str), run["id"]])

    def checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it to zero bytes (deleted rows leave no copy there)."""
        if str(self.path) != ":memory:":
            with self._lock:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def learnable(self, pick_ids: list[int], user_ids: set[str]) -> bool:
        """Whether every one of these picks still exists and every user still lets learning use their data
        (false after a forget or `/learning off` that came while a night was training on them)."""
        if user_ids:
            row = self._one("SELECT COUNT(*) AS n FROM users WHERE learning_opt_out = 0 AND id IN "
                            "(SELECT value FROM json_each(?))", json.dumps(sorted(user_ids)))
            if row["n"] != len(user_ids):
                return False
        row = self._one("SELECT COUNT(*) AS n FROM picks WHERE id IN (SELECT value FROM json_each(?))",
                        json.dumps(sorted(set(pick_ids))))
        return row["n"] == len(set(pick_ids))

    # -- reactions ------------------------------------------------------------------------------

    def set_reaction(self, user_id: str, turn_id: int, value: int, emoji: str = "") -> None:
        """Thumbs up (+1) or down (-1) on a reply; a later reaction on the same turn replaces it."""
        with self.transaction():
            self.db["reactions"].upsert({"user_id": user_id, "turn_id": turn_id, "value": value, "emoji": emoji,
                                         "created_at": now()}, pk=("user_id", "turn_id"))

    def clear_reaction(self, user_id: str, turn_id: int) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM reactions WHERE user_id = ? AND turn_id = ?", [user_id, turn_id])

    # -- feedback for training ------------------------------------------------------------------

    def users_with_picks(self) -> list[str]:
        """Users who picked at least one reply themselves (auto-picked single replies teach nothing)."""
        return [row["user_id"] for row in self.db.query("SELECT DISTINCT user_id FROM picks WHERE auto = 0")]

    def preference_records(self, user_id: str | None = None, after_pick_id: int = 0,
                           pick_ids: list[int] | None = None) -> Iterator[dict]:
        """One record per real pick: the prompt exactly as the model saw it, the chosen text, the rejected
        siblings (shown beside it and not picked) and the unshown ones (sampled whole, ranked lower, never
        offered; partial replies pruned after their opening are left out).

        Automatic picks (a set with a single distinct candidate) and users who opted out of learning are left out.
        `pick_ids` reads only those picks (a night's sample), whatever the history's length.
        """
        sql = ("SELECT p.id AS pick_id, s.id AS set_id, s.user_id, s.prompt, s.context_json, s.generation, "
               "s.sampling_json, p.candidate_id, p.created_at FROM picks p JOIN candidate_sets s ON s.id = p.set_id "
               "JOIN users u ON u.id = s.user_id WHERE u.learning_opt_out = 0 AND p.auto = 0 AND p.id > ?")
        params: list[Any] = [after_pick_id]
        if user_id is not None:
            sql += " AND s.user_id = ?"
            params.append(user_id)
        if pick_ids is not None:
            sql += " AND p.id IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(sorted(pick_ids)))
        for row in self.db.query(sql + " ORDER BY p.id", params):
            candidates = list(self.db.query("SELECT id, text, shown, pruned FROM candidates WHERE set_id = ? "
                                            "ORDER BY idx", [row["set_id"]]))
            yield {
                "pick_id": row["pick_id"], "set_id": row["set_id"], "user_id": row["user_id"], "prompt": row["prompt"],
                "context": json.loads(row["context_json"]), "generation": row["generation"],
                "sampling": json.loads(row["sampling_json"]), "picked_at": row["created_at"],
                "chosen": next(c["text"] for c in candidates if c["id"] == row["candidate_id"]),
                "rejected": [c["text"] for c in candidates if c["id"] != row["candidate_id"] and c["shown"]],
                "unshown": [c["text"] for c in candidates if not c["shown"] and not c["pruned"]],  # never judged
            }

    def pick_ids(self, user_id: str | None = None) -> list[int]:
        """Ids of the picks `preference_records` would yield, oldest first (cheap: no texts are read)."""
        sql = ("SELECT p.id FROM picks p JOIN users u ON u.id = p.user_id "
               "WHERE u.learning_opt_out = 0 AND p.auto = 0")
        params: list[Any] = []
        if user_id is not None:
            sql += " AND p.user_id = ?"
            params.append(user_id)
        return [row["id"] for row in self.db.query(sql + " ORDER BY p.id", params)]

    def thumb_records(self, user_id: str | None = None) -> Iterator[dict]:
        """Thumbs on picked replies: the prompt of the set the reply came from, the reply, and the label."""
        sql = ("SELECT r.id AS reaction_id, r.user_id, r.value, t.text, s.prompt, s.context_json FROM reactions r "
               "JOIN turns t ON t.id = r.turn_id JOIN candidate_sets s ON s.id = t.candidate_set_id "
               "JOIN users u ON u.id = r.user_id WHERE u.learning_opt_out = 0")
        params: list[Any] = []
        if user_id is not None:
            sql += " AND r.user_id = ?"
            params.append(user_id)
        for row in self.db.query(sql + " ORDER BY r.id", params):
            yield {"user_id": row["user_id"], "prompt": row["prompt"], "context": json.loads(row["context_json"]),
                   "completion": row["text"], "label": row["value"] > 0}

    # -- rankers (bot/ranking.py) ----------------------------------------------------------------

    def ranker(self, user_id: str) -> list[float] | None:
        """The user's learned ranker weights, None when they have none (the prior ranks their offers)."""
        row = self._one("SELECT weights_json FROM rankers WHERE user_id = ?", user_id)
        return json.loads(row["weights_json"]) if row else None

    def save_ranker(self, user_id: str, weights: list[float], picks: int) -> None:
        with self.transaction():
            self.db["rankers"].upsert({"user_id": user_id, "weights_json": json.dumps(weights), "picks": picks,
                                       "updated_at": now()}, pk="user_id")

    def drop_ranker(self, user_id: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM rankers WHERE user_id = ?", [user_id])

    def ranking_history(self, user_id: str, limit: int) -> list[dict]:
        """The user's last `limit` picks among ranked offers, newest first: per pick, the chosen candidate's
        signals (`chosen`: logprob, relevance, state) and those of the shown siblings (`rejected`)."""
        picks = list(self.db.query("SELECT p.set_id, p.candidate_id FROM picks p WHERE p.user_id = ? AND p.auto = 0 "
                                   "ORDER BY p.id DESC LIMIT ?", [user_id, limit]))
        rows: dict[str, list[dict]] = {}
        for row in self.db.query("SELECT id, set_id, logprob, relevance, state FROM candidates WHERE shown = 1 "
                                 "AND logprob IS NOT NULL AND set_id IN (SELECT value FROM json_each(?))",
                                 [json.dumps([p["set_id"] for p in picks])]):
            rows.setdefault(row["set_id"], []).append(row)
        history = []
        for pick in picks:
            siblings = rows.get(pick["set_id"], [])
            chosen = [c for c in siblings if c["id"] == pick["candidate_id"]]
            rejected = [c for c in siblings if c["id"] != pick["candidate_id"]]
            if chosen and rejected:
                history.append({"chosen": chosen[0], "rejected": rejected})
        return history

    # -- generations ----------------------------------------------------------------------------

    def add_generation(self, lineage: str, number: int, path: str, parent_id: int | None, status: str,
                       metrics: dict, last_pick_id: int, reason: str = "") -> int:
        with self.transaction():
            return self.db["generations"].insert({
                "lineage": lineage, "number": number, "path": path, "parent_id": parent_id, "status": status,
                "metrics_json": json.dumps(metrics, sort_keys=True), "created_at": now(),
                "last_pick_id": last_pick_id, "reason": reason}).last_pk

    def generations(self, lineage: str | None = None) -> list[dict]:
        sql, params = "SELECT * FROM generations", []
        if lineage is not None:
            sql, params = sql + " WHERE lineage = ?", [lineage]
        return [_with_metrics(row) for row in self.db.query(sql + " ORDER BY lineage, number", params)]

    def generation(self, generation_id: int) -> dict | None:
        row = self._one("SELECT * FROM generations WHERE id = ?", generation_id)
        return _with_metrics(row) if row else None

    def serving(self, lineage: str) -> dict | None:
        """The generation served for `lineage`, or None for the base model."""
        row = self._one("SELECT generation_id FROM serving WHERE lineage = ?", lineage)
        return self.generation(row["generation_id"]) if row and row["generation_id"] else None

    def set_serving(self, lineage: str, generation_id: int | None) -> None:
        with self.transaction():
            self.db["serving"].upsert({"lineage": lineage, "generation_id": generation_id, "updated_at": now()},
                                      pk="lineage")

    def serving_pointers(self) -> dict[str, int | None]:
        """Lineage -> the id of the generation it serves (None: the base model)."""
        return {row["lineage"]: row["generation_id"] for row in self.db.query("SELECT * FROM serving")}

    def adapter_errors(self) -> dict[str, str]:
        """Served adapter name -> why it could not be loaded (its parent serves instead)."""
        return {row["name"].removeprefix(ADAPTER_ERROR): row["value"]
                for row in self.db.query("SELECT * FROM flags WHERE name LIKE ?", [ADAPTER_ERROR + "%"])}

    def stats(self) -> dict[str, int]:
        tables = ["users", "conversations", "turns", "candidate_sets", "picks", "reactions", "generations"]
        return {t: self.db[t].count for t in tables}

    # -- rollover runs (one row per night, with each lineage's outcome) ---------------------------

    def start_run(self, executor: str = "local") -> int:
        with self.transaction():
            return self.db["rollover_runs"].insert({"started_at": now(), "status": "running",
                                                    "executor": executor}).last_pk

    def run_progress(self, run_id: int, summary: str, **counts: int) -> None:
        """A night's progress so far: its outcomes (`summary`) and lineages_total/done/failed, retries."""
        unknown = set(counts) - {"lineages_total", "lineages_done", "lineages_failed", "retries"}
        if unknown:
            raise ValueError(f"not a progress count: {sorted(unknown)}")
        with self.transaction():
            self.db["rollover_runs"].update(run_id, {"summary": summary, **counts})

    def finish_run(self, run_id: int, status: str, summary: str) -> None:
        with self.transaction():
            self.db["rollover_runs"].update(run_id, {"finished_at": now(), "status": status, "summary": summary})

    def time_out_runs(self) -> None:
        """A rollover process was stopped for running too long: its run says so instead of "running"."""
        with self.transaction():
            self.db.execute("UPDATE rollover_runs SET status = 'timed out', finished_at = ? WHERE status = 'running'",
                            [now()])

    def last_run(self) -> dict | None:
        return self._one("SELECT * FROM rollover_runs ORDER BY id DESC LIMIT 1")

    # -- helpers --------------------------------------------------------------------------------

    def _one(self, sql: str, *params: Any) -> dict | None:
        rows = list(self.db.query(sql, list(params)))
        return rows[0] if rows else None


def _with_metrics(row: dict) -> dict:
    row["metrics"] = json.loads(row.pop("metrics_json"))
    return row


class _ThreadSafeDatabase(sqlite_utils.Database):
    """One connection shared by the event loop and worker threads (prompts, exports, forgets): sqlite-utils
    wraps every query in a savepoint of one fixed name, so statements from two threads take turns."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock):
        self._lock = lock
        super().__init__(conn)

    def query(self, sql: str, params=None):
        with self._lock:
            rows = list(super().query(sql, params))
        yield from rows

    def execute(self, sql: str, parameters=None):
        with self._lock:
            return super().execute(sql, parameters)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, re-entrant: nested uses join the outer transaction."""

    def __init__(self, store: Store):
        self.store = store
        self.outer = False

    def __enter__(self):
        self.store._lock.acquire()
        self.outer = not self.store.db.conn.in_transaction
        if self.outer:
            self.store.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.outer:
                self.store.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
        return False
