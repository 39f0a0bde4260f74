"""`tagray` subcommands: each module has `main(argv) -> int` (tests call it directly)."""
