"""What the Feedback deployment does, without Serve (SPEC §8): check a batch of users'
verdicts on suggested tags against the model's vocabulary and the index's images, and store
them durably (tagray/data/feedback.py) before the request is acknowledged.

    POST /v1/feedback  {"request_id": "…", "verdicts": [{"image_id": "img1" | "upload_sha256": "<hex>",
                                                        "tag": "beach", "verdict": "present" | "absent"}, …]}

A tag is normalised as a search term is; an unknown tag, an image the index does not list, a
malformed upload digest is a 422 naming it, and nothing of that request is stored. The answer
(`stored`, `duplicates`) comes after the commit; re-sending a request_id stores nothing twice.
"""

from __future__ import annotations

import logging

from tagray.data.feedback import UPLOAD_ID, FeedbackStore, Verdict
from tagray.serve.errors import RequestError, shown

log = logging.getLogger(__name__)


class FeedbackService:
    """A model's vocabulary (and its index's image ids, when there is an index) and the store."""

    def __init__(self, model_dir: str, index_dir: str | None, url: str, base_dir: str | None,
                 endpoint_url: str | None = None) -> None:
        from tagray.data.normalize import TagNormalizer
        from tagray.heads.models import load_model
        from tagray.index import open_index
        from tagray.serve.service import display_name

        head = load_model(model_dir, endpoint_url)
        self.vocab = head.vocab
        self.normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
        self.model = f"{display_name(model_dir)}@{head.vocab.version}"
        self.images: set[str] | None = None
        if index_dir:
            info = open_index(index_dir, endpoint_url)  # sharded, or a single-directory index of earlier versions
            self.images = set(info.image_ids().to_pylist()) - info.tombstones()
        self.store = FeedbackStore.open(url, base_dir)
        log.info("feedback: verdicts on %s go to %s (%d stored so far)", self.model, self.store.path, self.store.count())

    def verdicts(self, items: list[dict], user: str) -> list[Verdict]:
        """Request items (already typed by the ingress) → Verdicts; RequestError 422 naming the
        first item that does not fit."""
        out = []
        for i, item in enumerate(items):
            image, upload = item.get("image_id"), item.get("upload_sha256")
            if (image is None) == (upload is None):
                raise RequestError(422, f"verdicts[{i}]: give exactly one of image_id and upload_sha256")
            if upload is not None:
                image = f"sha256:{upload.lower()}"
                if not UPLOAD_ID.match(image):
                    raise RequestError(422, f"verdicts[{i}]: upload_sha256 {shown(upload)} is not 64 hex digits")
            elif self.images is None:
                raise RequestError(422, f"verdicts[{i}]: this app has no index to check image {shown(image)} "
                                        "against; judge uploads by upload_sha256 (POST /v1/tag returns it)")
            elif image not in self.images:
                raise RequestError(422, f"verdicts[{i}]: unknown image {shown(image)}: not in the index",
                                   code="unknown_image")
            tag = self.normalizer.normalize_tag(item["tag"])
            if tag is None or tag not in self.vocab.index:
                raise RequestError(422, f"verdicts[{i}]: unknown tag {shown(item['tag'])}: not in the model's "
                                        "vocabulary (GET /v1/tags)", code="unknown_term")
            out.append(Verdict(image, tag, item["verdict"] == "present", user, self.model))
        return out

    def submit(self, request_id: str, items: list[dict], user: str) -> dict:
        verdicts = self.verdicts(items, user)
        stored = self.store.add(request_id, verdicts)
        return {"request_id": request_id, "stored": stored, "duplicates": len(verdicts) - stored}

    def stats(self) -> dict:
        per_tag = self.store.stats()
        return {"verdicts": sum(t["present"] + t["absent"] for t in per_tag.values()), "tags": per_tag}
