"""tagray/resources.py's local helpers."""

from __future__ import annotations

import os

from tagray import resources


def test_local_cpus_is_the_affinity_on_linux_and_the_cpu_count_where_the_os_has_none(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        assert resources.local_cpus() == 3
        monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have none
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert resources.local_cpus() == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert resources.local_cpus() == 1
