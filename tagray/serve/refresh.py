"""A running replica's view of its index, kept current without a redeploy.

`tagray index --append`, `--delete` and `--compact` commit a new version of index.json
(tagray/index/format.py). Every Searcher replica and the Ingress hold an `IndexRefresh`: on a
request, at most once every `index_refresh_s`, it re-reads index.json (one small object) in a
background thread and, when the version changed, calls `load(info)` there — the replica builds
its new shard group beside the old one and swaps it in; requests meanwhile are answered from the
old version, so an append costs no downtime and no partial answer for the images already
indexed. One load at a time; a failed read or load is logged and retried at the next check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tagray.data import storage
from tagray.index.format import IndexInfo, open_index

log = logging.getLogger(__name__)


class IndexRefresh:
    def __init__(self, uri: str, endpoint_url: str | None, every_s: float, version: Callable[[], int],
                 load: Callable[[IndexInfo], None]) -> None:
        self.uri, self.endpoint_url, self.every_s = uri, endpoint_url, every_s
        self.version, self.load = version, load
        self._next = time.monotonic() + every_s
        self._busy = threading.Lock()

    def poke(self) -> None:
        """Starts a check when one is due and none is running; returns at once."""
        now = time.monotonic()
        if self.every_s <= 0 or now < self._next or not self._busy.acquire(blocking=False):
            return
        self._next = now + self.every_s
        threading.Thread(target=self._check, name="index-refresh", daemon=True).start()

    def check_now(self) -> bool:
        """The check, in the caller's thread (tests, the command line): True when it loaded a new version."""
        with self._busy:
            return self._load_if_newer()

    def _check(self) -> None:
        try:
            self._load_if_newer()
        finally:
            self._busy.release()

    def _load_if_newer(self) -> bool:
        try:
            info = open_index(self.uri, self.endpoint_url)
            if info.version == self.version():
                return False
            self.load(info)
            log.info("index %s: now serving version %d", storage.redact(info.uri), info.version)
            return True
        except Exception as e:  # noqa: BLE001 — keep serving the loaded version; retried at the next check
            log.warning("index refresh failed (still serving version %d): %s: %s", self.version(), type(e).__name__, e)
            return False
