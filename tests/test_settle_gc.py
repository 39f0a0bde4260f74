"""tagray.serve.app.settle_gc: a replica's start-up objects leave the cyclic collector's way."""

from __future__ import annotations

import gc
import weakref

from tagray.serve.app import settle_gc


class _Node:
    pass


def _cycle() -> tuple[_Node, weakref.ref]:
    node = _Node()
    node.me = node
    return node, weakref.ref(node)


def test_settle_gc_collects_old_cycles_freezes_the_living_and_frees_them_at_the_next_settle():
    before = _cycle()[1]  # garbage already: collected before the freeze
    kept, kept_ref = _cycle()
    try:
        frozen = settle_gc()
        assert before() is None
        assert frozen == gc.get_freeze_count() > 0
        del kept
        gc.collect()
        assert kept_ref() is not None  # frozen: full collections no longer look at it
        later = _cycle()[1]
        gc.collect()
        assert later() is None  # garbage made after the freeze is collected as usual
        settle_gc()
        assert kept_ref() is None  # the next settle unfreezes first, so an earlier freeze's garbage goes
    finally:
        gc.unfreeze()
