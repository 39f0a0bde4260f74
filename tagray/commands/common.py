"""Flags shared by subcommands, and the error boundary that turns known failures into
one-line messages with exit status 2."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable

from tagray.config import ConfigError
from tagray.data.normalize import NormalizerMismatch
from tagray.data.schema import SchemaError
from tagray.data.word_vectors import WordVectorError
from tagray.data.wordnet import WordNetUnavailable

USER_ERRORS = (ConfigError, SchemaError, NormalizerMismatch, WordNetUnavailable, FileNotFoundError, WordVectorError)


def add_overrides(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"override a {what} setting")


def add_model_inputs(parser: argparse.ArgumentParser, model_help: str, manifest_help: str) -> None:
    """--model, --manifest, --features: what calibrate and evaluate read."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--manifest", required=True, help=manifest_help)
    parser.add_argument("--features", required=True, help="features of the manifest's images")


def add_endpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint for s3:// URIs (default: $AWS_ENDPOINT_URL, else AWS)",
    )


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def command(name: str) -> Callable:
    """Decorates a `main(argv)`: logging set up, known user errors → message + exit 2."""

    def wrap(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            setup_logging()
            try:
                return fn(argv)
            except USER_ERRORS as e:
                print(f"tagray {name}: error: {e}", file=sys.stderr)
                return 2

        return main

    return wrap
