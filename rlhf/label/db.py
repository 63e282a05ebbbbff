"""SQLite storage of a labeling project: schema, set-up and every query the app makes.

One file is one project: its settings (task kind, overlap, rating scale), the items built from a
candidates file, labelers with their invites and sessions, which item was handed to whom, and
the answers. Only the standard `sqlite3` driver is used.

Durability: WAL mode with synchronous=FULL, so a commit has reached the disk before the server
acknowledges the answer, and killing the server loses nothing it acknowledged. Writes in this
process queue on one lock and run as BEGIN IMMEDIATE transactions, so they never deadlock on
lock upgrades; other processes (an export while serving) wait on the busy timeout.

Exactly once: an answer carries an idempotency key unique per labeler, and a partial unique
index allows one live (not undone) answer per item and labeler. A repeated request finds the
stored answer and returns it instead of writing a second one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from rlhf.data import Candidates, Content, as_text

Task = Literal["pair", "rank", "rate"]
Scale = Literal["thumbs", "1-7"]
TASKS = ("pair", "rank", "rate")
SCALES = ("thumbs", "1-7")

LEASE_SECONDS = 30 * 60
"""An item handed to a labeler is held for them this long; after that it may go to someone else
too (their answer is still accepted), so a labeler who walks away does not block the item."""

SESSION_SECONDS = 14 * 24 * 3600
"""A session ends after this long unused; every use renews it (at most once a minute, so that
reading pages does not write to the database on every request)."""
RENEW_SECONDS = 60

INVITE_SECONDS = 7 * 24 * 3600
"""A sign-in link works once, within this long of being issued."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS project (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id          INTEGER PRIMARY KEY,
    prompt      TEXT NOT NULL,           -- a conversation's as "role: content" text (see `messages`)
    completions TEXT NOT NULL,           -- JSON list: 2 for a pair, K for a ranking, 1 for a rating
    fingerprint TEXT NOT NULL UNIQUE,    -- sha256 of prompt and completions: importing twice adds nothing
    source      TEXT NOT NULL,           -- file:line of the candidates record
    messages    TEXT,                    -- JSON list of {role, content} when the prompt is a conversation
    gold        TEXT                     -- JSON of the known right answer of a quality-control item, else NULL
);
CREATE TABLE IF NOT EXISTS labelers (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    is_admin    INTEGER NOT NULL DEFAULT 0,
    invite_hash TEXT UNIQUE,             -- sha256 of the one-time sign-in link; NULL once used
    created_at  REAL NOT NULL,
    invite_expires_at REAL,              -- when the sign-in link stops working
    revoked_at  REAL                     -- set: no sign-in, no session (a new link restores access)
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash  TEXT PRIMARY KEY,        -- sha256 of the cookie value; the cookie itself is never stored
    labeler_id  INTEGER NOT NULL REFERENCES labelers(id),
    csrf        TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id     INTEGER NOT NULL REFERENCES items(id),
    labeler_id  INTEGER NOT NULL REFERENCES labelers(id),
    state       TEXT NOT NULL CHECK (state IN ('pending', 'answered', 'skipped')),
    assigned_at REAL NOT NULL,
    PRIMARY KEY (item_id, labeler_id)
);
CREATE INDEX IF NOT EXISTS assignments_of_labeler ON assignments (labeler_id, state);
CREATE TABLE IF NOT EXISTS answers (
    id              INTEGER PRIMARY KEY,
    item_id         INTEGER NOT NULL REFERENCES items(id),
    labeler_id      INTEGER NOT NULL REFERENCES labelers(id),
    value           TEXT NOT NULL,       -- JSON: see `Answer.value`
    reason          TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT NOT NULL,
    created_at      REAL NOT NULL,
    undone_at       REAL,
    UNIQUE (labeler_id, idempotency_key)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_answer ON answers (item_id, labeler_id) WHERE undone_at IS NULL;
"""


class StoreError(Exception):
    """A request the data does not allow; `kind` says which (the app maps it to an HTTP status)."""

    def __init__(self, kind: Literal["not_found", "conflict", "invalid"], message: str):
        self.kind = kind
        super().__init__(message)


class LateAnswer(StoreError):
    """An answer after the lease ran out to an item that others have answered `overlap` times
    since; the item has left the labeler's queue."""


@dataclass(frozen=True)
class Project:
    task: Task
    """pair: A better / B better / tie / skip; rank: order K completions; rate: score one completion."""
    overlap: int
    """How many different labelers answer each item, so that their agreement can be measured."""
    scale: Scale
    """The rating scale of a rate project: thumbs up/down (0/1) or 1 to 7."""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if not isinstance(self.overlap, int) or self.overlap < 1:
            raise ValueError(f"overlap must be a whole number >= 1, got {self.overlap!r}")


@dataclass(frozen=True)
class Item:
    id: int
    prompt: Content
    """As the candidates file gave it: a string or a list of messages."""
    completions: list[str]
    source: str
    gold: object = None
    """The known right answer of a quality-control item (as `Answer.value`); None for the others."""


def _item(row: sqlite3.Row, id_column: str = "id") -> Item:
    prompt = json.loads(row["messages"]) if row["messages"] is not None else row["prompt"]
    gold = json.loads(row["gold"]) if row["gold"] is not None else None
    return Item(row[id_column], prompt, json.loads(row["completions"]), row["source"], gold)


@dataclass(frozen=True)
class Labeler:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class Session:
    labeler: Labeler
    csrf: str


@dataclass(frozen=True)
class Answer:
    id: int
    item_id: int
    labeler: str
    value: object
    """pair: 0 or 1 (the index in the item of the better completion) or "tie"; rank: list of
    completion indices best to worst; rate: 0/1 (thumbs) or 1..7; None: skipped."""
    reason: str
    created_at: float
    undone: bool
    labeler_id: int


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _fingerprint(prompt: Content, texts: list[str], gold: object) -> str:
    return _hash(json.dumps([prompt, texts] if gold is None else [prompt, texts, "gold"]))


def _answer(row: sqlite3.Row) -> Answer:
    return Answer(
        row["id"], row["item_id"], row["name"], json.loads(row["value"]), row["reason"], row["created_at"],
        row["undone_at"] is not None, row["labeler_id"],
    )


# ---------------------------------------------------------------- items from candidates


def build_items(records: list[Candidates], task: Task) -> tuple[list[tuple[Content, list[str], str]], int]:
    """(prompt, completions, source) per item, and how many candidates were left out.

    pair: every two distinct completions of a prompt; rank: all of them (at least two);
    rate: each on its own. Empty and repeated completions are left out, as `load_feedback`
    would refuse the pairs and rankings they make.
    """
    items, dropped = [], 0
    for record in records:
        texts: list[str] = []
        for candidate in record.candidates:
            if candidate.completion.strip() and candidate.completion not in texts:
                texts.append(candidate.completion)
            else:
                dropped += 1
        if task == "rate":
            items.extend((record.prompt, [text], record.source) for text in texts)
        elif len(texts) < 2:
            dropped += len(texts)
        elif task == "rank":
            items.append((record.prompt, texts, record.source))
        else:
            items.extend((record.prompt, list(pair), record.source) for pair in itertools.combinations(texts, 2))
    return items, dropped


# ---------------------------------------------------------------- the store


def _add_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    """Add a column a project file from an earlier version lacks; returns whether it was added."""
    if column.split()[0] in {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}:
        return False
    try:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        return True
    except sqlite3.OperationalError as exc:  # another process added it first
        if "duplicate column" not in str(exc):
            raise
        return False


class Store:
    """One project file. Thread-safe: each thread gets its own connection."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        # Columns that project files from earlier versions lack: conversational prompts, then
        # expiring sign-in links and revocation (an unused old invite gets the usual time left).
        _add_column(conn, "items", "messages TEXT")
        _add_column(conn, "items", "gold TEXT")
        if _add_column(conn, "labelers", "invite_expires_at REAL"):
            conn.execute(
                "UPDATE labelers SET invite_expires_at = ? WHERE invite_hash IS NOT NULL", (time.time() + INVITE_SECONDS,)
            )
        _add_column(conn, "labelers", "revoked_at REAL")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def write(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. `durable=False` skips the fsync for data a crash may lose
        (item leases); the next durable commit syncs it along with its own."""
        conn = self._conn()
        with self._write_lock:
            if not durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query in it sees the same snapshot."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------ project

    def project(self) -> Project | None:
        with self.read() as conn:
            rows = dict(conn.execute("SELECT key, value FROM project").fetchall())
        if "task" not in rows:
            return None
        return Project(rows["task"], int(rows["overlap"]), rows["scale"])

    def set_project(self, project: Project) -> Project:
        """Store the settings of a new project, or check that they match those stored. The
        overlap may be raised later (items already complete go out again to more labelers);
        lowering it, or changing the task or scale, would misread the answers already given."""
        with self.write() as conn:
            rows = dict(conn.execute("SELECT key, value FROM project").fetchall())
            if "task" not in rows:
                conn.executemany(
                    "INSERT INTO project (key, value) VALUES (?, ?)",
                    [("task", project.task), ("overlap", str(project.overlap)), ("scale", project.scale)],
                )
                return project
            stored = Project(rows["task"], int(rows["overlap"]), rows["scale"])
            if (stored.task, stored.scale) == (project.task, project.scale) and project.overlap > stored.overlap:
                conn.execute("UPDATE project SET value = ? WHERE key = 'overlap'", (str(project.overlap),))
                return project
        if stored != project:
            raise StoreError(
                "conflict",
                f"{self.path} holds a project with task={stored.task}, overlap={stored.overlap}, "
                f"scale={stored.scale}; it cannot change to task={project.task}, overlap={project.overlap}, "
                f"scale={project.scale} (the overlap can only be raised; start a new --db for a new project)",
            )
        return stored

    def add_items(self, items: list[tuple[Content, list[str], str]], gold: list[object] | None = None) -> int:
        """Insert items not already present; returns how many were new. `gold`: the right
        answer of each item, for quality-control items."""
        answers = [None] * len(items) if gold is None else gold
        with self.write() as conn:
            before = conn.total_changes
            # A pair is the same item in either order: the fingerprint of the other order is checked too.
            conn.executemany(
                "INSERT OR IGNORE INTO items (prompt, messages, completions, fingerprint, source, gold)"
                " SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM items WHERE fingerprint = ?)",
                [
                    (
                        as_text(prompt), json.dumps(prompt, ensure_ascii=False) if isinstance(prompt, list) else None,
                        json.dumps(texts, ensure_ascii=False), _fingerprint(prompt, texts, answer), source,
                        None if answer is None else json.dumps(answer),
                        _fingerprint(prompt, texts[::-1] if len(texts) == 2 else texts, answer),
                    )
                    for (prompt, texts, source), answer in zip(items, answers, strict=True)
                ],
            )
            return conn.total_changes - before

    def setting(self, key: str, default: str) -> str:
        with self.read() as conn:
            row = conn.execute("SELECT value FROM project WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self.write() as conn:
            conn.execute("INSERT OR REPLACE INTO project (key, value) VALUES (?, ?)", (key, value))

    def item(self, item_id: int) -> Item | None:
        with self.read() as conn:
            row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return _item(row) if row else None

    # ------------------------------------------------------------ labelers and sessions

    def add_labeler(self, name: str, is_admin: bool = False) -> tuple[str, bool]:
        """Create a labeler, or give an existing one a new sign-in link (which also restores a
        revoked labeler); returns (sign-in token, created). Any earlier unused link stops working;
        sessions already open stay open (a second device)."""
        token = secrets.token_urlsafe(24)
        expires = time.time() + INVITE_SECONDS
        with self.write() as conn:
            row = conn.execute("SELECT id FROM labelers WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO labelers (name, is_admin, invite_hash, invite_expires_at, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (name, int(is_admin), _hash(token), expires, time.time()),
                )
                return token, True
            conn.execute(
                "UPDATE labelers SET invite_hash = ?, invite_expires_at = ?, revoked_at = NULL,"
                " is_admin = MAX(is_admin, ?) WHERE id = ?",
                (_hash(token), expires, int(is_admin), row["id"]),
            )
            return token, False

    def revoke(self, name: str) -> int:
        """End a labeler's access: every session at once and any unused sign-in link. Their
        answers stay. Returns how many sessions were ended."""
        with self.write() as conn:
            row = conn.execute("SELECT id FROM labelers WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise StoreError("not_found", f"there is no labeler {name!r}")
            conn.execute(
                "UPDATE labelers SET revoked_at = ?, invite_hash = NULL, invite_expires_at = NULL WHERE id = ?",
                (time.time(), row["id"]),
            )
            return conn.execute("DELETE FROM sessions WHERE labeler_id = ?", (row["id"],)).rowcount

    def invited(self, token: str) -> tuple[Labeler | None, bool]:
        """(the labeler an unused sign-in link belongs to, whether it has expired), without using it."""
        with self.read() as conn:
            row = conn.execute("SELECT * FROM labelers WHERE invite_hash = ?", (_hash(token),)).fetchone()
        if row is None:
            return None, False
        return Labeler(row["id"], row["name"], bool(row["is_admin"])), row["invite_expires_at"] <= time.time()

    def redeem_invite(self, token: str) -> tuple[str, Labeler] | None:
        """Use up a sign-in link that has not expired and open a session; returns (session
        token, labeler) or None."""
        session = secrets.token_urlsafe(32)
        now = time.time()
        with self.write() as conn:
            row = conn.execute(
                "SELECT * FROM labelers WHERE invite_hash = ? AND invite_expires_at > ?", (_hash(token), now)
            ).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE labelers SET invite_hash = NULL, invite_expires_at = NULL WHERE id = ?", (row["id"],))
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            conn.execute(
                "INSERT INTO sessions (token_hash, labeler_id, csrf, expires_at) VALUES (?, ?, ?, ?)",
                (_hash(session), row["id"], secrets.token_urlsafe(32), now + SESSION_SECONDS),
            )
        return session, Labeler(row["id"], row["name"], bool(row["is_admin"]))

    def session(self, token: str) -> Session | None:
        """The open session of a cookie, renewed for another SESSION_SECONDS since it is in use."""
        now = time.time()
        with self.read() as conn:
            row = conn.execute(
                "SELECT l.id, l.name, l.is_admin, s.csrf, s.expires_at FROM sessions s"
                " JOIN labelers l ON l.id = s.labeler_id WHERE s.token_hash = ? AND s.expires_at > ?",
                (_hash(token), now),
            ).fetchone()
        if row is None:
            return None
        if row["expires_at"] < now + SESSION_SECONDS - RENEW_SECONDS:
            with self.write(durable=False) as conn:
                conn.execute(
                    "UPDATE sessions SET expires_at = MAX(expires_at, ?) WHERE token_hash = ?",
                    (now + SESSION_SECONDS, _hash(token)),
                )
        return Session(Labeler(row["id"], row["name"], bool(row["is_admin"])), row["csrf"])

    def end_session(self, token: str) -> None:
        with self.write() as conn:
            conn.execute("DELETE FROM sessions WHERE token_hash = ?", (_hash(token),))

    # ------------------------------------------------------------ handing out items

    _OPEN_ITEMS = """
        FROM items i
        LEFT JOIN (
            SELECT item_id, COUNT(*) AS taken FROM assignments
            WHERE state = 'answered' OR (state = 'pending' AND assigned_at > :cutoff)
            GROUP BY item_id
        ) t ON t.item_id = i.id
        WHERE COALESCE(t.taken, 0) < :overlap AND i.gold IS NULL
          AND NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.labeler_id = :me)
    """
    # Skips do not count towards the overlap: a skipped item goes to someone else instead.

    def next_item(self, labeler_id: int, overlap: int, gold_rate: float = 0.0) -> Item | None:
        """The item this labeler should answer now: one already handed to them and not answered
        (the most recent first, so an undone answer comes straight back), else a new one, the
        items closest to their full overlap first so that agreement can be measured early.
        While there is work left, a quality-control item they have not seen comes instead
        whenever fewer than `gold_rate` of the items handed to them were quality-control ones;
        those go to every labeler and do not count towards the overlap."""
        now = time.time()
        with self.write(durable=False) as conn:
            row = conn.execute(
                "SELECT item_id FROM assignments WHERE labeler_id = ? AND state = 'pending'"
                " ORDER BY assigned_at DESC LIMIT 1",
                (labeler_id,),
            ).fetchone()
            if row is None:
                row = conn.execute(
                    f"SELECT i.id AS item_id {self._OPEN_ITEMS} ORDER BY COALESCE(t.taken, 0) DESC, i.id LIMIT 1",
                    {"cutoff": now - LEASE_SECONDS, "overlap": overlap, "me": labeler_id},
                ).fetchone()
                if row is None:
                    return None
                gold_seen, seen = conn.execute(
                    "SELECT COALESCE(SUM(i.gold IS NOT NULL), 0), COUNT(*) FROM assignments a"
                    " JOIN items i ON i.id = a.item_id WHERE a.labeler_id = ?",
                    (labeler_id,),
                ).fetchone()
                if gold_seen < gold_rate * (seen + 1):
                    row = conn.execute(
                        "SELECT i.id AS item_id FROM items i WHERE i.gold IS NOT NULL AND NOT EXISTS"
                        " (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.labeler_id = ?)"
                        " ORDER BY i.id LIMIT 1",
                        (labeler_id,),
                    ).fetchone() or row
                conn.execute(
                    "INSERT INTO assignments (item_id, labeler_id, state, assigned_at) VALUES (?, ?, 'pending', ?)",
                    (row["item_id"], labeler_id, now),
                )
            item = conn.execute("SELECT * FROM items WHERE id = ?", (row["item_id"],)).fetchone()
        return _item(item)

    def progress(self, labeler_id: int, overlap: int) -> dict:
        """Counts for the progress bars: this labeler's answers and what is left for them, and
        the project's answers against items x overlap."""
        with self.read() as conn:
            mine = dict(
                conn.execute(
                    "SELECT state, COUNT(*) FROM assignments WHERE labeler_id = ? GROUP BY state", (labeler_id,)
                ).fetchall()
            )
            open_items = conn.execute(
                f"SELECT COUNT(*) {self._OPEN_ITEMS}",
                {"cutoff": time.time() - LEASE_SECONDS, "overlap": overlap, "me": labeler_id},
            ).fetchone()[0]
            items, done = conn.execute(
                "SELECT (SELECT COUNT(*) FROM items WHERE gold IS NULL), COALESCE(SUM(MIN(n, ?)), 0) FROM"
                " (SELECT COUNT(*) AS n FROM assignments a JOIN items i ON i.id = a.item_id"
                "  WHERE a.state = 'answered' AND i.gold IS NULL GROUP BY a.item_id)",
                (overlap,),
            ).fetchone()
        answered = mine.get("answered", 0) + mine.get("skipped", 0)
        return {
            "answered": answered,
            "left": mine.get("pending", 0) + open_items,
            "project_done": done,
            "project_total": items * overlap,
        }

    # ------------------------------------------------------------ answers

    def submit(self, labeler_id: int, item_id: int, value: object, reason: str, key: str,
               overlap: int | None = None) -> tuple[Answer, bool]:
        """Store an answer once; returns (answer, replayed). A request repeated with the same
        idempotency key returns the stored answer; the same key for a different answer, an item
        not handed to this labeler, or a second answer to the same item is refused. So is an
        answer given after the lease ran out to an item that others have since answered
        `overlap` times: it would pass the overlap (the item leaves this labeler's queue)."""
        encoded = json.dumps(value)
        with self.write() as conn:
            row = conn.execute(
                "SELECT a.*, l.name FROM answers a JOIN labelers l ON l.id = a.labeler_id"
                " WHERE a.labeler_id = ? AND a.idempotency_key = ?",
                (labeler_id, key),
            ).fetchone()
            if row is not None:
                if row["item_id"] != item_id or row["value"] != encoded or row["reason"] != reason:
                    raise StoreError("conflict", "this idempotency key was already used for a different answer")
                return _answer(row), True
            assignment = conn.execute(
                "SELECT state, assigned_at FROM assignments WHERE item_id = ? AND labeler_id = ?", (item_id, labeler_id)
            ).fetchone()
            if assignment is None:
                raise StoreError("not_found", f"item {item_id} is not in your queue")
            if assignment["state"] != "pending":
                raise StoreError("conflict", f"you already answered item {item_id}; undo that answer to change it")
            now = time.time()
            late = overlap is not None and value is not None and assignment["assigned_at"] <= now - LEASE_SECONDS
            if late and conn.execute(
                "SELECT COUNT(*) FROM assignments WHERE item_id = ? AND state = 'answered' AND labeler_id != ?"
                " AND (SELECT gold IS NULL FROM items WHERE id = ?)",  # gold items go to everyone
                (item_id, labeler_id, item_id),
            ).fetchone()[0] >= overlap:
                conn.execute("DELETE FROM assignments WHERE item_id = ? AND labeler_id = ?", (item_id, labeler_id))
                row = None
            else:
                cursor = conn.execute(
                    "INSERT INTO answers (item_id, labeler_id, value, reason, idempotency_key, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (item_id, labeler_id, encoded, reason, key, now),
                )
                conn.execute(
                    "UPDATE assignments SET state = ? WHERE item_id = ? AND labeler_id = ?",
                    ("skipped" if value is None else "answered", item_id, labeler_id),
                )
                row = conn.execute(
                    "SELECT a.*, l.name FROM answers a JOIN labelers l ON l.id = a.labeler_id WHERE a.id = ?",
                    (cursor.lastrowid,),
                ).fetchone()
        if row is None:
            raise LateAnswer("conflict", f"item {item_id} got its {overlap} answers from others while it waited")
        return _answer(row), False

    def last_answer(self, labeler_id: int) -> Answer | None:
        """This labeler's most recent live answer, the one that undo takes back."""
        with self.read() as conn:
            row = conn.execute(
                "SELECT a.*, l.name FROM answers a JOIN labelers l ON l.id = a.labeler_id"
                " WHERE a.labeler_id = ? AND a.undone_at IS NULL ORDER BY a.id DESC LIMIT 1",
                (labeler_id,),
            ).fetchone()
        return _answer(row) if row else None

    def undo(self, labeler_id: int, answer_id: int) -> Answer:
        """Take back this labeler's last answer; its item comes back to them. Undoing an answer
        already undone changes nothing, so a repeated request cannot take back a second one."""
        with self.write() as conn:
            row = conn.execute(
                "SELECT a.*, l.name FROM answers a JOIN labelers l ON l.id = a.labeler_id"
                " WHERE a.id = ? AND a.labeler_id = ?",
                (answer_id, labeler_id),
            ).fetchone()
            if row is None:
                raise StoreError("not_found", f"you have no answer {answer_id}")
            if row["undone_at"] is not None:
                return _answer(row)
            last = conn.execute(
                "SELECT MAX(id) FROM answers WHERE labeler_id = ? AND undone_at IS NULL", (labeler_id,)
            ).fetchone()[0]
            if last != answer_id:
                raise StoreError("conflict", "only your last answer can be undone")
            now = time.time()
            conn.execute("UPDATE answers SET undone_at = ? WHERE id = ?", (now, answer_id))
            conn.execute(
                "UPDATE assignments SET state = 'pending', assigned_at = ? WHERE item_id = ? AND labeler_id = ?",
                (now, row["item_id"], labeler_id),
            )
        return _answer(row)

    def answers_of(self, labeler_id: int, limit: int = 100) -> list[tuple[Answer, Item]]:
        with self.read() as conn:
            rows = conn.execute(
                "SELECT a.*, l.name, i.prompt, i.messages, i.completions, i.source, i.gold FROM answers a"
                " JOIN labelers l ON l.id = a.labeler_id JOIN items i ON i.id = a.item_id"
                " WHERE a.labeler_id = ? ORDER BY a.id DESC LIMIT ?",
                (labeler_id, limit),
            ).fetchall()
        return [
            (_answer(r), _item(r, "item_id")) for r in rows
        ]

    # ------------------------------------------------------------ admin and export

    def live_answers(self, item_id: int | None = None) -> list[Answer]:
        """Every answer not undone (skips included), oldest first."""
        where = "a.undone_at IS NULL" + (" AND a.item_id = ?" if item_id is not None else "")
        with self.read() as conn:
            rows = conn.execute(
                "SELECT a.*, l.name FROM answers a JOIN labelers l ON l.id = a.labeler_id"
                f" WHERE {where} ORDER BY a.id",
                () if item_id is None else (item_id,),
            ).fetchall()
        return [_answer(r) for r in rows]

    def items(self, ids: list[int] | None = None) -> dict[int, Item]:
        with self.read() as conn:
            rows = conn.execute("SELECT * FROM items ORDER BY id").fetchall()
        wanted = None if ids is None else set(ids)
        return {
            r["id"]: _item(r)
            for r in rows
            if wanted is None or r["id"] in wanted
        }

    def overview(self, overlap: int) -> dict:
        """Project progress and per-labeler counts for the admin page."""
        with self.read() as conn:
            per_item = [
                n
                for (n,) in conn.execute(
                    "SELECT (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND a.state = 'answered')"
                    " FROM items i WHERE i.gold IS NULL"
                ).fetchall()
            ]
            labelers = conn.execute(
                """SELECT l.name, l.is_admin, l.invite_hash IS NOT NULL AS invited, l.revoked_at IS NOT NULL AS revoked,
                          SUM(a.undone_at IS NULL AND a.value != 'null') AS answered,
                          SUM(a.undone_at IS NULL AND a.value = 'null') AS skipped,
                          SUM(a.undone_at IS NULL AND a.value = '"tie"') AS ties,
                          SUM(a.undone_at IS NOT NULL) AS undone,
                          MAX(a.created_at) AS last_at
                   FROM labelers l LEFT JOIN answers a ON a.labeler_id = l.id
                   GROUP BY l.id ORDER BY l.name"""
            ).fetchall()
        return {
            "items": len(per_item),
            "complete": sum(n >= overlap for n in per_item),
            "started": sum(0 < n < overlap for n in per_item),
            "untouched": sum(n == 0 for n in per_item),
            "done": sum(min(n, overlap) for n in per_item),
            "needed": len(per_item) * overlap,
            "labelers": [dict(r) for r in labelers],
        }

    def answer_seconds(self) -> list[tuple[str, float]]:
        """(labeler, seconds from the item being handed to them to their live answer) per answer."""
        with self.read() as conn:
            rows = conn.execute(
                "SELECT l.name, a.created_at - s.assigned_at FROM answers a"
                " JOIN assignments s ON s.item_id = a.item_id AND s.labeler_id = a.labeler_id"
                " JOIN labelers l ON l.id = a.labeler_id WHERE a.undone_at IS NULL"
            ).fetchall()
        return [(name, seconds) for name, seconds in rows]

    def integrity_check(self) -> str:
        with self.read() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]
