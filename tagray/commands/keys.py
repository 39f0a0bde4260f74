"""`tagray keys new [--scopes read,write]`: a fresh API key for the Serve app, printed once,
with the hash entry the server holds (put it in the Serve config's `api_keys` or in
$TAGRAY_API_KEYS; the key itself goes only to the client)."""

import argparse

from tagray.commands.common import command
from tagray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray keys", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="make a key and print its server entry")
    new.add_argument("--scopes", default="read", help="comma-separated: read (tag, search), write (change state)")
    return p


@command("keys")
def main(argv: list[str] | None = None) -> int:
    from tagray.serve.auth import entry_for, new_key

    args = build_parser().parse_args(argv)
    key = new_key()
    try:
        entry = entry_for(key, [s.strip() for s in args.scopes.split(",") if s.strip()])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"server entry (api_keys in the Serve config, or $TAGRAY_API_KEYS): {entry}")
    return 0
