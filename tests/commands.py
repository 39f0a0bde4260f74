"""`tagray` subcommands run in the test process, as a user's shell would run them."""

from __future__ import annotations

import contextlib
import io


def cli(*argv: str) -> str:
    """`tagray ARGV…` in this process; its stdout (a failure fails the test)."""
    from tagray import cli as tagray

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = tagray.main(list(argv))
    assert rc == 0, (argv, buf.getvalue()[-2000:])
    return buf.getvalue()
