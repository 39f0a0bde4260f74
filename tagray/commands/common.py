"""Flags shared by subcommands, and the error boundary that turns known failures into
one-line messages: user errors (USER_ERRORS, also when a Ray worker raised them) exit 2,
any other exception a Ray worker raised exits 1 with that exception's own last line instead
of Ray's wrapped traceback."""

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
from tagray.jsonio import NonFiniteError

USER_ERRORS = (ConfigError, SchemaError, NormalizerMismatch, WordNetUnavailable, FileNotFoundError, WordVectorError,
               NonFiniteError)


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


# Libraries whose INFO lines are not for a tagray user: faiss's loader reports, at INFO, that it
# "could not load library with AVX2 support due to: ModuleNotFoundError" before loading its
# generic build, every time an index is built or searched.
QUIET_LOGGERS = ("faiss.loader",)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _is_ray_error(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] == "ray"


def worker_error(e: BaseException) -> BaseException | None:
    """The first USER_ERRORS exception inside Ray's wrappers of `e`: RayTaskError's `cause`,
    Ray Train's WorkerGroupError `worker_failures` (rank → exception), chained `__cause__`s."""
    queue, seen = [e], set()
    while queue:
        x = queue.pop(0)
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, USER_ERRORS) and not _is_ray_error(x):  # RayTaskError(ConfigError) is both: look inside
            return x
        failures = getattr(x, "worker_failures", None)
        inner = [getattr(x, "cause", None), x.__cause__, *(failures.values() if isinstance(failures, dict) else ())]
        queue += [i for i in inner if isinstance(i, BaseException)]
    return None


def last_line(e: BaseException) -> str:
    """The last line of an exception's text: for Ray's wrapped tracebacks, the worker's own
    `Type: message` (as tagray.tune.sweep records a failed trial)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().startswith("(")]
    return (lines[-1] if lines else type(e).__name__)[:500]


def command(name: str) -> Callable:
    """Decorates a `main(argv)`: logging set up, known user errors → message + exit 2, and
    failures inside Ray workers → their own one line (exit 2 if a user error, else 1)."""

    def wrap(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            setup_logging()
            try:
                return fn(argv)
            except Exception as e:
                if not _is_ray_error(e):
                    if isinstance(e, USER_ERRORS):
                        print(f"tagray {name}: error: {e}", file=sys.stderr)
                        return 2
                    raise  # a bug here: keep its traceback
                own = worker_error(e)
                print(f"tagray {name}: error: {own if own is not None else last_line(e)}", file=sys.stderr)
                return 2 if own is not None else 1

        return main

    return wrap
