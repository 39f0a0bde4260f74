"""Loading any saved head by the kind its model.json names (lr, rlr: linear; embed; neighbors, refine)."""

from __future__ import annotations

import json

from tagray.data import storage
from tagray.data.normalize import NORMALIZER_FILE, TagNormalizer
from tagray.heads.artifact import SavedHead, head_kind, load_head
from tagray.heads.embed_artifact import SavedEmbedHead, load_embed_head
from tagray.heads.net_artifact import NET_HEADS, SavedNetHead, load_net_head


def load_model(model_dir: str, endpoint_url: str | None = None) -> SavedHead | SavedEmbedHead | SavedNetHead:
    """Any saved head, with the normaliser it was saved with."""
    saved = storage.join(model_dir, NORMALIZER_FILE)
    if not storage.exists(saved, endpoint_url):
        raise FileNotFoundError(f"{model_dir}: not a tagray model (no {NORMALIZER_FILE}); train one with `tagray train`")
    normalizer = TagNormalizer.from_identity(json.loads(storage.read_text(saved, endpoint_url)))
    kind = head_kind(model_dir, endpoint_url)
    load = load_embed_head if kind == "embed" else load_net_head if kind in NET_HEADS else load_head
    return load(model_dir, normalizer, endpoint_url)


def load_image_tagger(model_dir: str, endpoint_url: str | None = None) -> SavedHead | SavedEmbedHead | SavedNetHead:
    """A head that tags an image from its features alone (what serve and index need): every head
    but the neighbourhood model, which also needs the image's metadata neighbours."""
    head = load_model(model_dir, endpoint_url)
    if head.config.head == "neighbors":
        from tagray.data.schema import SchemaError

        raise SchemaError(f"{model_dir}: a neighbors head scores an image together with its metadata neighbours, "
                          "which a single request does not have; serve or index an image-only head "
                          "(lr, rlr, embed, refine), and evaluate this one with `tagray evaluate`")
    return head
