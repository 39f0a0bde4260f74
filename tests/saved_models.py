"""Saved model directories as older tagray versions wrote them."""

from __future__ import annotations

import json
from pathlib import Path


def as_saved_before_standardisation(model_dir: Path) -> None:
    """Rewrites a model directory as it was written before its head z-scored φ: no
    `feature_shift` / `feature_scale` in weights.safetensors, no `standardize` in model.json."""
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(model_dir / "weights.safetensors").items() if not k.startswith("feature_")}
    save_file(weights, model_dir / "weights.safetensors")
    meta = json.loads((model_dir / "model.json").read_text())
    del meta["config"]["standardize"]
    (model_dir / "model.json").write_text(json.dumps(meta))
