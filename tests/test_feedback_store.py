"""The verdict store (tagray/data/feedback.py) on a real SQLite file: durable before `add`
returns (a process SIGKILLed mid-stream loses nothing it acknowledged), exactly once per
(request_id, position), every verdict kept, the read policies, bad URLs named."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tagray.data.feedback import FeedbackError, FeedbackStore, Verdict, sqlite_path

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import sys
from tagray.data.feedback import FeedbackStore, Verdict
store = FeedbackStore.open(sys.argv[1])
for r in range(100000):
    store.add(f"req-{r}", [Verdict(f"img{r}", "beach", r % 2 == 0, "u"), Verdict(f"img{r}", "sea", True, "u")])
    print(f"ack req-{r}", flush=True)  # acknowledged only after add() returned (the commit)
"""


def test_a_writer_killed_mid_stream_loses_nothing_it_acknowledged(tmp_path):
    url = f"sqlite:///{tmp_path}/feedback.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    acked = []
    deadline = time.monotonic() + 120
    while len(acked) < 200 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(line.split()[1])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    acked += [line.split()[1] for line in proc.stdout.read().splitlines() if line.startswith("ack ")]
    assert len(acked) >= 200
    store = FeedbackStore.open(url)
    stored = store.table()
    requests = set(stored.column("request_id").to_pylist())
    assert set(acked) <= requests  # every acknowledged request is there…
    assert stored.num_rows == 2 * len(requests)  # …whole (a transaction), and nothing twice
    assert len(set(zip(stored.column("request_id").to_pylist(), stored.column("position").to_pylist(),
                       strict=True))) == stored.num_rows


def test_a_request_stored_once_and_every_verdict_kept(tmp_path):
    store = FeedbackStore.open(f"sqlite:///{tmp_path}/f.db")
    batch = [Verdict("a", "beach", True, "u1", "m@1"), Verdict("a", "beach", False, "u2", "m@1")]
    assert store.add("r1", batch, at=1.0) == 2
    assert store.add("r1", batch, at=2.0) == 0  # a retry of the same request: nothing twice
    assert store.add("r2", [Verdict("a", "beach", True, "u2", "m@1")], at=3.0) == 1  # u2 changes their mind
    assert store.add("r3", [Verdict("a", "beach", False, "u3", "m@1"), Verdict("b", "sea", True, "u1", "m@1")],
                     at=4.0) == 2
    assert store.count() == 5 and store.table().column("at").to_pylist() == [1.0, 1.0, 3.0, 4.0, 4.0]
    assert store.stats() == {"beach": {"present": 2, "absent": 2, "images": 1, "users": 3},
                             "sea": {"present": 1, "absent": 0, "images": 1, "users": 1}}
    latest = {(r["image_id"], r["tag"]): r for r in store.resolved("latest").to_pylist()}
    # latest per user: u1 present, u2 present (changed), u3 absent → present 2:1
    assert latest[("a", "beach")]["present"] and (latest[("a", "beach")]["votes_present"],
                                                   latest[("a", "beach")]["votes_absent"]) == (2, 1)
    assert latest[("b", "sea")]["present"]
    majority = {(r["image_id"], r["tag"]) for r in store.resolved("majority").to_pylist()}
    assert majority == {("b", "sea")}  # every verdict counts: beach 2:2 is a tie, left out
    with pytest.raises(FeedbackError, match="policy 'mean'"):
        store.resolved("mean")
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_urls_name_the_forms_tagray_reads(tmp_path):
    assert sqlite_path("sqlite:///rel/f.db", "/base") == "/base/rel/f.db"
    assert sqlite_path("sqlite:////abs/f.db", "/base") == "/abs/f.db"
    for bad in ("postgres://db/x", "f.db", "sqlite:///", "sqlite:///dir/"):
        with pytest.raises(FeedbackError, match="sqlite:///"):
            sqlite_path(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeedbackError, match="feedback store"):
        FeedbackStore.open(f"sqlite:///{tmp_path}/file/inside.db")


def test_the_serve_config_names_a_bad_feedback_url():
    from tagray.config import ConfigError, from_dict
    from tagray.serve.service import ServeConfig

    assert from_dict(ServeConfig, {"model": "m", "feedback": "sqlite:///runs/f.db"}, "args").feedback
    with pytest.raises(ConfigError, match=r"args: feedback store 'postgres://db/x': expected sqlite:///"):
        from_dict(ServeConfig, {"model": "m", "feedback": "postgres://db/x"}, "args")
