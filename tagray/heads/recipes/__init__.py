"""Each head's training recipe (tagray/heads/recipe.py has the protocol and the one loop).

`build_recipe(head, cfg, inputs)` is how every runner — in-process, the Ray Train worker, a Ray
Tune trial — gets a head's recipe from plain data (a config dict or dataclass and a dict of
arrays and scalars), so the same settings give the same computation wherever they run.
"""

from __future__ import annotations

from typing import Any

from tagray.heads.recipe import Recipe

HEADS = ("lr", "rlr", "embed", "neighbors", "refine")


def config_class(head: str) -> type:
    """The config dataclass of `head` (the only place its defaults live)."""
    if head in ("lr", "rlr"):
        from tagray.heads.fit import HeadConfig

        return HeadConfig
    if head == "embed":
        from tagray.heads.embedding import EmbedConfig

        return EmbedConfig
    if head == "neighbors":
        from tagray.heads.neighborhood import NeighborsConfig

        return NeighborsConfig
    if head == "refine":
        from tagray.heads.refine import RefineConfig

        return RefineConfig
    raise ValueError(f"unknown head {head!r}: one of {', '.join(HEADS)}")


def build_recipe(head: str, cfg: Any, inputs: dict) -> Recipe:
    """The recipe of `head` with config `cfg` (its dataclass, or a dict of it) on `inputs`."""
    from tagray.config import from_dict

    if isinstance(cfg, dict):
        cfg = from_dict(config_class(head), cfg, "head config")
    if head in ("lr", "rlr"):
        from tagray.heads.recipes.linear import LinearRecipe

        return LinearRecipe(cfg, **inputs)
    if head == "embed":
        from tagray.heads.recipes.embed import EmbedRecipe

        return EmbedRecipe(cfg, **inputs)
    if head == "neighbors":
        from tagray.heads.recipes.neighbors import NeighborsRecipe

        return NeighborsRecipe(cfg, **inputs)
    if head == "refine":
        from tagray.heads.recipes.refine import RefineRecipe

        return RefineRecipe(cfg, **inputs)
    raise ValueError(f"unknown head {head!r}: one of {', '.join(HEADS)}")
