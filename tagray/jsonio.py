"""Finite numbers at tagray's boundaries. JSON that stays JSON: every report, metrics and sweep
file tagray writes goes through `dumps`; a training loss that is not finite stops the run
(`check_loss`); both raise `NonFiniteError`, a user error the CLI prints as one line.

Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` for non-finite floats, which
RFC 8259 (§6: "Numeric values that cannot be represented … such as Infinity and NaN are not
permitted") and every strict parser reject. `dumps` refuses them instead, naming where in the
object the first one is, so a NaN model or metric fails where it is written. A value that is
legitimately undefined (an AUC of a tag without positives) is written as `null` by the code
that builds the report (`finite_or_none`), with the reason next to it.
"""

from __future__ import annotations

import json
import math
from typing import Any


class NonFiniteError(ValueError, FloatingPointError):
    """A NaN or ±inf where tagray writes or reads a number that must be finite (a FloatingPointError
    too: what the in-process trainers raised for a diverged loss before)."""


def check_loss(loss: float, epoch: int, step: int, hint: str = "lower lr") -> float:
    """`loss`, or NonFiniteError naming the epoch (1-based), the step and the loss: a diverged run
    stops here, before it reports, checkpoints or writes a model, so the last checkpoint is
    the last good one."""
    if not math.isfinite(loss):
        raise NonFiniteError(f"training diverged: loss {loss} at epoch {epoch}, step {step}; {hint}")
    return loss


def non_finite_path(obj: Any, path: str = "$") -> str | None:
    """The key path (`$.annotation.micro_auc`, `$.history[3].loss`) of the first non-finite
    float in `obj` (dicts, lists, tuples of plain Python values), or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path
    if isinstance(obj, dict):
        items = ((f"{path}.{k}", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    return next((found for where, v in items if (found := non_finite_path(v, where))), None)


def dumps(obj: Any, what: str = "JSON", **kwargs: Any) -> str:
    """`json.dumps(obj, allow_nan=False, **kwargs)`; NonFiniteError naming `what` and the key
    path of the first NaN / ±inf instead of writing an invalid literal. numpy scalars are
    written as the Python numbers they hold (so a float32 NaN is caught, not turned into "nan"
    by a `default=str`)."""
    kwargs["default"] = _plain(kwargs.get("default"))
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        if "Out of range float" not in str(e):
            raise
        # the same object as plain data (numpy values through `default`), NaN read back as float
        found = non_finite_path(json.loads(json.dumps(obj, **kwargs)))
        raise NonFiniteError(f"{what}: {found or 'a value'} is not finite (NaN or ±inf); "
                             "refusing to write invalid JSON") from None


def _plain(default: Any) -> Any:
    def convert(obj: Any) -> Any:
        if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
            return obj.item()
        if default is None:
            raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
        return default(obj)

    return convert


def finite_or_none(x: float | None) -> float | None:
    """`x` as a float, or None (JSON null) when it is missing or not finite: for metrics that are
    undefined by construction (no positives, no queries), never for a model's numbers."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
