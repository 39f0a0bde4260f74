"""What an index needs of a head: its kind, its identity (digest), and its outputs for a batch of
features — log P(z=1|x) of a linear or refine head (seed 001 §5.3, calibrated with β when the
head is), f = h(x) of the embed head (seed 004 §2), and the "search by example" vector of a
linear head (the L2-normalised feature)."""

from __future__ import annotations

import numpy as np

from tagray.data import schema

# torch and the embed head's artifact are imported where a head is used: `tagray.index` (its format,
# shard groups and merge) is imported by Serve's Ingress, which holds no model.


def is_embed(head) -> bool:
    """Whether `head` is the embed head (seed 004) rather than a linear or refine one."""
    from tagray.heads.embed_artifact import SavedEmbedHead

    return isinstance(head, SavedEmbedHead)


def head_digest(head) -> str:
    """Identity of a linear head's weights and intercepts (an index belongs to one)."""
    from tagray.heads.artifact import state_digest

    return state_digest(head.model)


def index_kind(head) -> str:
    return "embeddings" if is_embed(head) else "predictions"


def model_identity(head) -> dict:
    """The index.json / shard.json keys naming the model an index was built with."""
    if is_embed(head):
        return {"kind": "embeddings", "mlp_digest": head.mlp_digest, "dim": int(head.vectors.shape[1])}
    return {"kind": "predictions", "weights_digest": head_digest(head), "tags": int(head.model.tags),
            "vocabulary_version": head.vocab.version}


def check_index_matches(meta: dict, head, where: str) -> None:
    """Refuses an index (by its index.json) built with another model than `head` (SchemaError)."""
    if meta.get("kind") == "predictions":
        if is_embed(head) or meta.get("weights_digest") != head_digest(head):
            raise schema.SchemaError(f"{where}: built with another model ({meta.get('model')!r}); "
                                     "rebuild it with `tagray index --model …`")
        return
    if not is_embed(head):
        raise schema.SchemaError(f"{where}: an image-embedding index needs an embed model, not {head.config.head!r}")
    if meta.get("mlp_digest") != head.mlp_digest:
        raise schema.SchemaError(f"{where}: built with another model ({meta.get('model')!r}, h digest "
                                 f"{meta.get('mlp_digest')}, this one {head.mlp_digest}); rebuild it with `tagray index --model …`")


def float_tensor(x: np.ndarray):
    """x as a float32 torch tensor, sharing its memory where it can. A batch Ray Data hands over
    (zero-copy from Arrow) is read-only, which torch.from_numpy warns about on every batch: that
    one is copied (a feature batch costs far less to copy than the head costs to run on it)."""
    import torch

    a = np.ascontiguousarray(x, np.float32)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def log_p_true(head, x: np.ndarray) -> np.ndarray:
    """(B, T) log P(z=1|x) of a linear/refine head (float32)."""
    import torch

    with torch.inference_mode():
        _, log_true = head.model.probabilities(float_tensor(x))
    return log_true.numpy()


def embed(head, x: np.ndarray) -> np.ndarray:
    """(B, d) f = h(x) of the embed head (a SavedEmbedHead; float32)."""
    import torch

    with torch.inference_mode():
        return head.mlp(float_tensor(x)).numpy()


def normalised(x: np.ndarray) -> np.ndarray:
    """x / ‖x‖ row by row (zero rows stay zero): cosine similarity as an inner product."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1), np.float32)


def example_vector(head, x: np.ndarray) -> np.ndarray:
    """The vector `similar()` searches with for an image of features x (B, D): f = h(x) for the
    embed head, the normalised feature for a linear head."""
    return embed(head, x) if is_embed(head) else normalised(x)
