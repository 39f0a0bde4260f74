"""API keys and per-key rate limits of the Serve app (SPEC §5).

Keys are bearer tokens (`Authorization: Bearer <key>`). The server holds only their SHA-256,
with the scopes each grants (`read`: tagging, search, the vocabulary and model; `write`:
endpoints that change state), as entries `SCOPES:sha256:HEX` in the Serve config's `api_keys`
or in the environment variable named by `api_keys_env` (default `TAGRAY_API_KEYS`, entries
separated by whitespace or `;`). A plain key in a config is refused. `tagray keys new` makes a
key and prints its entry.

A request without a key, or with one the server does not hold, is a 401; a key without the
route's scope a 403; a key over its rate (a token bucket of `rate_limit_burst` requests refilled
at `rate_limit_per_s`, per Ingress replica) a 429 with Retry-After. The presented key's hash is
compared with every held hash by `hmac.compare_digest`, so the time taken says nothing of how
much of a key matched. With no keys configured every route is open (the local demo).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tagray.serve.errors import RequestError

SCOPES = ("read", "write")
ENTRY = re.compile(r"^(?P<scopes>[a-z]+(?:,[a-z]+)*):sha256:(?P<hex>[0-9a-f]{64})$")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits)."""
    return "tgr_" + secrets.token_urlsafe(32)


def entry_for(key: str, scopes: Iterable[str]) -> str:
    """The line a server holds for `key`: `read,write:sha256:…`."""
    scopes = list(scopes)
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}, got {scopes}")
    return ",".join(scopes) + ":" + hash_key(key)


@dataclass(frozen=True)
class HeldKey:
    digest: bytes
    scopes: frozenset[str]

    @property
    def label(self) -> str:
        """How logs and limits name the key: its hash's first 8 hex digits, never the key."""
        return self.digest.hex()[:8]


def parse_entries(entries: Iterable[str], source: str) -> list[HeldKey]:
    """`SCOPES:sha256:HEX` entries → held keys; ValueError naming `source` for anything else
    (above all a plain key, which must never sit in a config)."""
    held = []
    for i, entry in enumerate(e.strip() for e in entries):
        if not entry:
            continue
        m = ENTRY.match(entry)
        if not m:
            raise ValueError(f"{source}: entry {i + 1} is not `SCOPES:sha256:<64 hex digits>` (a key's hash, never "
                             "the key itself; `tagray keys new` prints one)")
        scopes = frozenset(m["scopes"].split(","))
        if not scopes <= set(SCOPES):
            raise ValueError(f"{source}: entry {i + 1} has scopes {sorted(scopes)}; known: {', '.join(SCOPES)}")
        held.append(HeldKey(bytes.fromhex(m["hex"]), scopes))
    return held


def split_env(value: str) -> list[str]:
    return [e for e in re.split(r"[\s;]+", value or "") if e]


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class KeyRing:
    """The keys a replica accepts, and their token buckets."""

    keys: list[HeldKey]
    rate_per_s: float = 0.0  # 0: no limit
    burst: int = 20
    clock: object = time.monotonic
    _buckets: dict[bytes, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def authorize(self, authorization: str | None, scope: str) -> HeldKey | None:
        """The key a request presents, if it may use `scope`; RequestError 401/403/429 otherwise.
        None when the app holds no keys (open)."""
        if not self.keys:
            return None
        challenge = {"WWW-Authenticate": 'Bearer realm="tagray"'}
        kind, _, token = (authorization or "").partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise RequestError(401, "this endpoint needs an API key: send `Authorization: Bearer <key>`",
                               code="unauthorized", headers=challenge)
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for held in self.keys:  # every comparison is made, found or not
            if hmac.compare_digest(held.digest, digest):
                found = held
        if found is None:
            raise RequestError(401, "unknown API key", code="unauthorized", headers=challenge)
        if scope not in found.scopes:
            raise RequestError(403, f"this key may {', '.join(sorted(found.scopes))}; this endpoint needs {scope!r}",
                               code="forbidden")
        self._take(found)
        return found

    def _take(self, key: HeldKey) -> None:
        if self.rate_per_s <= 0:
            return
        now = self.clock()
        with self._lock:
            bucket = self._buckets.setdefault(key.digest, _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
            bucket.updated = now
            if bucket.tokens < 1.0:
                wait = math.ceil((1.0 - bucket.tokens) / self.rate_per_s)
                raise RequestError(429, f"key {key.label}… is over its rate of {self.rate_per_s:g} requests/s "
                                        f"(burst {self.burst})", code="rate_limited",
                                   headers={"Retry-After": str(max(1, wait))})
            bucket.tokens -= 1.0
