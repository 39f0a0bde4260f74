"""Users' verdicts on suggested tags, kept durably (SPEC §8: the loop with users).

A verdict says that a tag is `present` in an image or `absent` from it; seed 001's calibration
(§4.4) needs exactly such clean labels, and the people using the service give them. Verdicts
live in a real database named by one URL everywhere (`tagray serve --feedback URL`, the Serve
config's `feedback`, `tagray calibrate --feedback URL`): the embedded default is SQLite in WAL
mode, `sqlite:///relative/path.db` or `sqlite:////absolute/path.db` (SQLAlchemy's spelling).

- Durable: `add` commits (synchronous=FULL) before it returns, and the server acknowledges a
  request only after that, so a process killed at any point loses nothing it acknowledged.
- Exactly once: each request carries a `request_id`; (request_id, position) is unique, so a
  client that retries a request whose answer it never saw adds nothing twice.
- Nothing is overwritten: duplicate and contradicting verdicts are all kept with their time,
  user and the model version that made the suggestion. Which one counts is a policy applied
  when reading (`resolved`):
    `latest` (default): each user's latest verdict on an (image, tag) counts once, and the
        (image, tag) is present when more users say present than absent (a tie counts as
        unknown and is left out);
    `majority`: every verdict counts, majority as above.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from tagray.config import ConfigError

POLICIES = ("latest", "majority")
UPLOAD_ID = re.compile(r"^sha256:[0-9a-f]{64}$")  # an upload, named by the digest of its bytes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    image_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    present INTEGER NOT NULL CHECK (present IN (0, 1)),
    user TEXT NOT NULL,
    model TEXT NOT NULL,
    at REAL NOT NULL,
    UNIQUE (request_id, position)
);
CREATE INDEX IF NOT EXISTS verdicts_tag ON verdicts (tag);
CREATE INDEX IF NOT EXISTS verdicts_image_tag ON verdicts (image_id, tag);
"""


class FeedbackError(ConfigError):
    """A feedback URL or store that cannot be used (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class Verdict:
    image_id: str  # an indexed image's id, or `sha256:<hex>` of an uploaded image's bytes
    tag: str  # a tag of the model's vocabulary (normalised)
    present: bool
    user: str = "anonymous"  # who said it (the API key's label when keys are on)
    model: str = ""  # the model version whose suggestion it judges


def sqlite_path(url: str, base_dir: str | None = None) -> str:
    """`sqlite:///rel.db` → base_dir/rel.db, `sqlite:////abs.db` → /abs.db; anything else is a
    FeedbackError naming the URL forms tagray reads."""
    if not isinstance(url, str) or not url.startswith("sqlite:///"):
        raise FeedbackError(f"feedback store {url!r}: expected sqlite:///relative/path.db or "
                            "sqlite:////absolute/path.db")
    path = url[len("sqlite:///"):]
    if not path or path.endswith("/"):
        raise FeedbackError(f"feedback store {url!r}: no database file name")
    if not os.path.isabs(path) and base_dir:
        path = os.path.join(base_dir, path)
    return path


class FeedbackStore:
    """One connection to the verdict database, safe to share between threads (serialised)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before add() returns
            self._db.execute("PRAGMA busy_timeout=30000")  # other replicas writing the same file
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise FeedbackError(f"feedback store {path}: {e}") from None
        if mode.lower() != "wal":
            raise FeedbackError(f"feedback store {path}: SQLite would not switch to WAL mode (got {mode!r})")

    @classmethod
    def open(cls, url: str, base_dir: str | None = None) -> FeedbackStore:
        return cls(sqlite_path(url, base_dir))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, request_id: str, verdicts: Iterable[Verdict], at: float | None = None) -> int:
        """Stores a request's verdicts in one transaction, committed before returning; the
        number newly stored (0 when this request_id was stored before: a retry)."""
        at = time.time() if at is None else at
        rows = [(request_id, i, v.image_id, v.tag, int(bool(v.present)), v.user, v.model, at)
                for i, v in enumerate(verdicts)]
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO verdicts (request_id, position, image_id, tag, present, user, model, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self._db.total_changes - before

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def table(self) -> pa.Table:
        """Every verdict, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT request_id, position, image_id, tag, present, user, model, at "
                                    "FROM verdicts ORDER BY id").fetchall()
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in range(8)]
        return pa.table({
            "request_id": pa.array(cols[0], pa.string()), "position": pa.array(cols[1], pa.int64()),
            "image_id": pa.array(cols[2], pa.string()), "tag": pa.array(cols[3], pa.string()),
            "present": pa.array([bool(p) for p in cols[4]], pa.bool_()), "user": pa.array(cols[5], pa.string()),
            "model": pa.array(cols[6], pa.string()), "at": pa.array(cols[7], pa.float64()),
        })

    def stats(self) -> dict[str, dict[str, int]]:
        """Per tag: verdicts saying present / absent, distinct images and users."""
        with self._lock:
            rows = self._db.execute(
                "SELECT tag, SUM(present), SUM(1 - present), COUNT(DISTINCT image_id), COUNT(DISTINCT user) "
                "FROM verdicts GROUP BY tag ORDER BY tag").fetchall()
        return {tag: {"present": p, "absent": a, "images": i, "users": u} for tag, p, a, i, u in rows}

    def resolved(self, policy: str = "latest") -> pa.Table:
        """One row per (image_id, tag) with a decided verdict under `policy` (module docstring):
        image_id, tag, present, votes_present, votes_absent, last_at."""
        if policy not in POLICIES:
            raise FeedbackError(f"feedback policy {policy!r}: expected one of {', '.join(POLICIES)}")
        source = "verdicts" if policy == "majority" else """(
            SELECT image_id, tag, present, at FROM (
                SELECT image_id, tag, present, at, ROW_NUMBER() OVER (
                    PARTITION BY image_id, tag, user ORDER BY at DESC, id DESC) AS rank
                FROM verdicts) WHERE rank = 1)"""
        query = f"""
            SELECT image_id, tag, SUM(present) AS yes, SUM(1 - present) AS no, MAX(at)
            FROM {source} GROUP BY image_id, tag HAVING yes != no ORDER BY image_id, tag"""
        with self._lock:
            rows = self._db.execute(query).fetchall()
        cols = list(zip(*rows, strict=True)) if rows else [[] for _ in range(5)]
        return pa.table({
            "image_id": pa.array(cols[0], pa.string()), "tag": pa.array(cols[1], pa.string()),
            "present": pa.array([y > n for y, n in zip(cols[2], cols[3], strict=True)], pa.bool_()),
            "votes_present": pa.array(cols[2], pa.int64()), "votes_absent": pa.array(cols[3], pa.int64()),
            "last_at": pa.array(cols[4], pa.float64()),
        })
