"""What the Serve deployments do, without Serve (SPEC §5): tag decoded images with a model
directory's backbone and head, and search an index of the corpus. Testable in one process;
tagray/serve/app.py wires it to HTTP and replicas.

Errors a client caused are `RequestError`s carrying the HTTP status they map to, with a
message naming the problem.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from tagray.data import storage
from tagray.features.backbone import build_backbone, read_weights
from tagray.features.decode import ImageError, decode

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A bad request: `status` is the HTTP status, the message says what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServeConfig:
    model: str = "runs/demo/model_rlr_calibrated"  # model directory (lr/rlr, calibrated or not, or embed)
    index: str | None = "runs/demo/index_rlr"  # index directory (tagray index) for /v1/search; None: no search
    weights: str | None = None  # backbone weights; default: the URI recorded in the model's backbone identity
    buckets: tuple[str, ...] = ()  # object-store buckets /v1/tag may read {"uri": "s3://bucket/key"} from
    endpoint_url: str | None = None  # S3-compatible endpoint for those reads
    max_image_bytes: int = 10 * 2**20  # larger uploads or objects → 413
    max_pixels: int = 40_000_000  # decompression-bomb guard → 400
    max_query_terms: int = 5  # more search terms → 422
    max_k: int = 100  # largest k of /v1/tag and /v1/search
    batch_size: int = 16  # @serve.batch: images per model call
    batch_wait_s: float = 0.0  # @serve.batch: wait for more requests; 0 = take what queued during the last call
    tagger_replicas: int = 1
    searcher_replicas: int = 1
    tagger_cpus: float = 1.0
    num_gpus: float = 0.0  # per tagger replica
    torch_threads: int = 0  # per tagger replica; 0 = torch's default
    base_dir: str | None = None  # relative paths (model, index, image uris) resolve here; default: where the app was built

    def __post_init__(self) -> None:
        from tagray.config import ConfigError

        if min(self.max_image_bytes, self.max_pixels, self.max_query_terms, self.max_k, self.batch_size,
               self.tagger_replicas, self.searcher_replicas) < 1:
            raise ConfigError("max_image_bytes, max_pixels, max_query_terms, max_k, batch_size and the replica "
                              "counts must be ≥ 1")
        if self.batch_wait_s < 0 or self.tagger_cpus < 0 or self.num_gpus < 0 or self.torch_threads < 0:
            raise ConfigError("batch_wait_s, tagger_cpus, num_gpus and torch_threads must be ≥ 0")
        bad = [b for b in self.buckets if not b or "/" in b or "://" in b]
        if bad:
            raise ConfigError(f"buckets are bucket names (no s3:// or /), got {bad}")


def resolve(uri: str, base_dir: str | None) -> str:
    """A relative local path against `base_dir`; URIs and absolute paths unchanged."""
    import os

    if base_dir is None or "://" in uri or os.path.isabs(uri):
        return uri
    return os.path.join(base_dir, uri)


def load_backbone(identity: dict, weights: str | None = None, endpoint_url: str | None = None):
    """The backbone a model's features came from, rebuilt from its identity (random weights
    from their recorded seed; a weights file must have the recorded digest)."""
    digest = identity["weights_digest"]
    if digest.startswith("random-seed-"):
        state, seed = None, int(digest.removeprefix("random-seed-"))
        log.warning("serve: the model was trained on features of RANDOM %s weights (seed %d)", identity["name"], seed)
    else:
        uri = weights or identity["weights"]
        state, got = read_weights(uri, endpoint_url)
        if got != digest:
            raise ValueError(f"backbone weights {uri} have digest {got}, the model was trained on {digest}")
        seed = 0
    model, dim = build_backbone(identity["name"], state, seed)
    if dim != identity["dim"]:
        raise ValueError(f"backbone {identity['name']} gives {dim}-D features, the model expects {identity['dim']}")
    return model


class TaggingService:
    """Backbone + head of a model directory: decoded images → top-k tags with P(y) and P(z)."""

    def __init__(self, model_dir: str, cfg: ServeConfig) -> None:
        from tagray.heads.models import load_image_tagger

        self.cfg = cfg
        self.model_dir = model_dir
        self.head = load_image_tagger(model_dir, cfg.endpoint_url)
        identity = self.head.backbone
        if not identity:
            raise ValueError(f"{model_dir}: no backbone identity (trained on features made outside `tagray featurize`)")
        self.identity = identity
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = torch.device("cuda" if cfg.num_gpus and torch.cuda.is_available() else "cpu")
        self.backbone = load_backbone(identity, cfg.weights, cfg.endpoint_url).to(self.device)
        self.tagger = self.head.model.to(self.device).eval()
        self.tags = list(self.head.vocab.tags)
        # A calibrated model answers with its calibrated tags: only their P(z) is a probability
        # (an uncalibrated RLR P(z) = σ(s) of a rarely-tagged free tag is near 1 everywhere).
        calibrated = np.nonzero(np.asarray(self.head.calibrated))[0]
        self.candidates = calibrated if len(calibrated) else np.arange(len(self.tags))
        self.mean = torch.tensor(identity["mean"], device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(identity["std"], device=self.device).view(1, 3, 1, 1) * 255

    def decode(self, data: bytes) -> np.ndarray:
        if len(data) > self.cfg.max_image_bytes:
            raise RequestError(413, f"image of {len(data)} bytes is over the limit of {self.cfg.max_image_bytes}")
        try:
            return decode(data, self.identity["image_size"], self.identity["resize_size"], self.cfg.max_pixels)
        except ImageError as e:
            raise RequestError(400, f"bad image: {e.reason}") from None

    def probabilities(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 → (P(y=1|x), P(z=1|x)), each (B, T)."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float()
            features = self.backbone(x.sub_(self.mean).div_(self.std))
            p_user, log_true = self.tagger.probabilities(features)
        return p_user.cpu().numpy(), np.exp(log_true.cpu().numpy())

    def top_tags(self, p_user: np.ndarray, p_true: np.ndarray, k: int, threshold: float) -> list[dict]:
        """The k candidate tags with the highest P(z) (at least `threshold`), best first."""
        order = self.candidates[np.argsort(-p_true[self.candidates], kind="stable")[:k]]
        return [{"tag": self.tags[j], "p_user": float(p_user[j]), "p_true": float(p_true[j])}
                for j in order if p_true[j] >= threshold]

    def tag(self, pixels: list[np.ndarray], ks: list[int], thresholds: list[float]) -> list[list[dict]]:
        """One model call for a batch of requests (each its own k and threshold)."""
        p_user, p_true = self.probabilities(np.stack(pixels))
        return [self.top_tags(pu, pt, k, th) for pu, pt, k, th in zip(p_user, p_true, ks, thresholds, strict=True)]

    def model_info(self) -> dict:
        metrics_uri = storage.join(self.model_dir, "metrics.json")
        metrics = json.loads(storage.read_text(metrics_uri, self.cfg.endpoint_url)) \
            if storage.exists(metrics_uri, self.cfg.endpoint_url) else {}
        return {
            "model": self.model_dir,
            "head": self.head.config.head,
            "version": self.head.vocab.version,
            "tags": len(self.tags),
            "calibrated": bool(np.asarray(self.head.calibrated).any()),
            "backbone": {k: self.identity.get(k) for k in ("name", "weights", "weights_digest", "dim")},
            "training": {k: metrics.get(k) for k in ("train_images", "steps", "final_loss", "mean_pi", "seconds")
                         if k in metrics},
        }


def check_uri(uri: object, buckets: tuple[str, ...]) -> tuple[str, str]:
    """An `s3://bucket/key` inside the configured buckets → (bucket, key); anything else →
    RequestError(400). The server never fetches http(s) URLs or local paths."""
    if not isinstance(uri, str) or not uri:
        raise RequestError(400, 'give the image as a multipart file, or JSON {"uri": "s3://bucket/key"}')
    if not uri.startswith("s3://"):
        raise RequestError(400, f"uri {uri!r} refused: only s3://bucket/key URIs in the configured buckets are read "
                                "(never http(s) URLs or local paths)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if bucket not in buckets or not key:
        raise RequestError(400, f"uri {uri!r} refused: bucket {bucket!r} is not among the configured buckets "
                                f"({', '.join(buckets) or 'none'})")
    return bucket, key


def fetch_uri(uri: str, cfg: ServeConfig) -> bytes:
    check_uri(uri, cfg.buckets)
    fs, path = storage.filesystem_for(uri, cfg.endpoint_url)
    info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        raise RequestError(400, f"uri {uri!r}: no such object")
    if info.size is not None and info.size > cfg.max_image_bytes:
        raise RequestError(413, f"object {uri} of {info.size} bytes is over the limit of {cfg.max_image_bytes}")
    return storage.read_bytes(uri, cfg.endpoint_url)


class SearchService:
    """Multi-tag AND search over a model's index (tagray index): for a linear head, images
    ranked by the product of calibrated P(z=1|x) over the query tags (seed 001 §5.3); for the
    embedding head, by f·Σ v_w over any vocabulary words, tagged or not (seed 004)."""

    def __init__(self, model_dir: str, index_dir: str, cfg: ServeConfig, head=None) -> None:
        from tagray.data.normalize import TagNormalizer
        from tagray.heads.embed_artifact import SavedEmbedHead
        from tagray.heads.models import load_image_tagger
        from tagray.serve.index import (
            WordIndex,
            check_index_matches,
            load_any_index,
            read_index_meta,
        )

        self.cfg = cfg
        self.head = head if head is not None else load_image_tagger(model_dir, cfg.endpoint_url)
        check_index_matches(read_index_meta(index_dir, cfg.endpoint_url), self.head, index_dir)
        self.index = load_any_index(index_dir, cfg.endpoint_url)
        self._rows: dict[str, int] | None = None
        self.normalizer = TagNormalizer.from_identity(self.head.vocab.normalizer)
        self.words = WordIndex.of(self.head) if isinstance(self.head, SavedEmbedHead) else None
        self.score = "f·Σv (sum of the words' logits)" if self.words else "product of calibrated P(z=1|x)"

    def image_bytes(self, image_id: str) -> bytes:
        """The bytes of an image the index lists (by its manifest uri), at most max_image_bytes."""
        if self._rows is None:
            self._rows = {i: r for r, i in enumerate(self.index.image_ids)}
        row = self._rows.get(image_id)
        uri = self.index.uris[row] if row is not None else None
        if uri is None:
            raise RequestError(404, f"image {image_id!r} is not in the index (or has no uri)")
        uri = resolve(uri, self.cfg.base_dir)
        try:
            data = storage.read_bytes(uri, self.cfg.endpoint_url)
        except (FileNotFoundError, OSError) as e:
            raise RequestError(404, f"image {image_id!r}: {e}") from None
        if len(data) > self.cfg.max_image_bytes:
            raise RequestError(413, f"image {image_id!r} is over {self.cfg.max_image_bytes} bytes")
        return data

    def terms(self, q: str | None) -> list[str]:
        terms = [t.strip() for t in (q or "").split(",") if t.strip()]
        if not terms:
            raise RequestError(422, "empty query: give q=tag1,tag2,…")
        if len(terms) > self.cfg.max_query_terms:
            raise RequestError(422, f"{len(terms)} query terms; at most {self.cfg.max_query_terms}")
        return terms

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.cfg.max_k:
            raise RequestError(422, f"k must be in [1, {self.cfg.max_k}], got {k}")
        return k

    def search(self, terms: list[str], k: int) -> list[dict]:
        from tagray.serve.index import UnknownWord

        self.check_k(k)
        if self.words is not None:
            try:
                hits = self.index.search(self.words.query_vector(terms), k)
            except UnknownWord as e:
                raise RequestError(422, f"{e}") from None
        else:
            columns = []
            for term in terms:
                tag = self.normalizer.normalize_tag(term)
                if tag is None or tag not in self.head.vocab.index:
                    shown = f"{term!r}" + (f" (normalised: {tag!r})" if tag and tag != term else "")
                    raise RequestError(422, f"unknown tag {shown}: not in the model's vocabulary (GET /v1/tags)")
                columns.append(self.head.vocab.index[tag])
            hits = self.index.search(columns, k)
        return [{"image_id": i, "uri": u, "score": s} for i, u, s in hits]
