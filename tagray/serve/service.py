"""What the Serve deployments do, without Serve (SPEC §5): tag decoded images with a model
directory's backbone and head, and search an index of the corpus. Testable in one process;
tagray/serve/app.py wires it to HTTP and replicas.

Errors are `RequestError`s (tagray/serve/errors.py) carrying the HTTP status they map to and
a message naming the problem: 4xx for what a client sent, 502/503/504 for a store that failed.

torch is imported where a model runs, not by this module: the Ingress replica imports it for its
settings and holds no model (tests/test_serve_views.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from tagray.data import storage
from tagray.features.decode import ImageError, decode
from tagray.serve.errors import RequestError, shown

__all__ = ["RequestError", "SearchService", "ServeConfig", "TaggingService", "fetch_uri", "parse_filters", "resolve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    model: str = ""  # model directory (lr/rlr/refine, calibrated or not, or embed); required
    index: str | None = None  # index directory (tagray index) for /v1/search; None: tagging only, search → 503
    feedback: str | None = None  # verdict store for POST /v1/feedback: sqlite:///PATH (relative to base_dir); None: 503
    weights: str | None = None  # backbone weights; default: the URI recorded in the model's backbone identity
    buckets: tuple[str, ...] = ()  # object-store buckets /v1/tag may read {"uri": "s3://bucket/key"} from
    endpoint_url: str | None = None  # S3-compatible endpoint for those reads
    max_image_bytes: int = 10 * 2**20  # larger uploads or objects → 413 (enforced while the body streams)
    max_json_bytes: int = 64 * 1024  # larger JSON (or other non-multipart) bodies → 413
    max_pixels: int = 40_000_000  # decompression-bomb guard → 400
    max_query_terms: int = 5  # more search terms → 422
    max_k: int = 100  # largest k of /v1/tag, /v1/search and /v1/similar
    max_offset: int = 1000  # largest offset (paging) of /v1/search and /v1/similar: each shard computes offset + k hits
    batch_size: int = 16  # @serve.batch: images per model call
    batch_wait_s: float = 0.0  # @serve.batch: wait for more requests; 0 = take what queued during the last call
    tagger_replicas: int = 1
    searcher_replicas: int = 1  # replicas of each search group
    # Search groups: deployments Searcher-0..G-1, each owning a subset of the index's shards (round
    # robin); the Ingress fans a query out to all and merges. 0 = one group per shard.
    search_groups: int = 0
    searcher_cpus: float = 0.25  # per search group replica
    # threads a replica's tag search scans its shards with (layout.top_and); 0 = one per whole CPU of
    # searcher_cpus, at least 1. More than it reserves when the node's cores are the Searchers' own
    # (Ray does not pin a replica to its CPUs: a reservation is a count, not cores)
    search_threads: int = 0
    # a Searcher keeps coarse codes of its shards' log P (tagray/index/layout.py: one byte per image and
    # tag in RAM on top of the two the index holds) and bounds multi-tag queries of common tags from
    # them (~2× faster scans at 10M images: BENCHMARKS); False: no extra memory, the scan reads the float16 rows
    scan_codes: bool = True
    search_timeout_s: float = 5.0  # a group that has not answered by then is missing from the answer (partial)
    group_retry_s: float = 2.0  # a group that failed is skipped (its shards reported missing) for this long
    # every replica re-reads index.json this often (when a request comes) and loads a newer version
    # (`tagray index --append/--delete/--compact`) in the background, answering from the old one meanwhile; 0: never
    index_refresh_s: float = 10.0
    tagger_cpus: float = 1.0
    num_gpus: float = 0.0  # per tagger replica
    torch_threads: int = 0  # per tagger replica; 0 = torch's default
    base_dir: str | None = None  # relative paths (model, index, image uris) resolve here; default: where the app was built
    # API keys (tagray/serve/auth.py): `SCOPES:sha256:HEX` entries, hashes only (a plain key is refused);
    # none here or in the environment variable = every endpoint open (the local demo)
    api_keys: tuple[str, ...] = ()
    api_keys_env: str = "TAGRAY_API_KEYS"  # more entries from this environment variable of the replicas
    require_api_keys: bool = False  # refuse to start without any key (the cluster configs set it)
    rate_limit_per_s: float = 0.0  # requests per second per key and Ingress replica (429 above); 0 = none
    rate_limit_burst: int = 20  # requests a key may make at once before the rate applies
    # Serve's replica lifecycle, for every deployment of the app: how often the controller asks each
    # replica whether it is alive (a replica whose process died is replaced after at most this long;
    # Serve's default is 10 s), how long a replica that does not answer that call may take before it
    # is replaced (a hung one), and how often a stopping replica looks whether its requests in flight
    # have finished (it stops once they have, or after Serve's graceful_shutdown_timeout_s of 20 s;
    # Serve's default look is every 2 s, which every rollout and shutdown waits out)
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_wait_loop_s: float = 0.5

    @property
    def scan_threads(self) -> int:
        """The threads of a Searcher's tag scan: search_threads, or one per whole CPU it reserves (≥ 1)."""
        return self.search_threads or max(1, int(self.searcher_cpus))

    def __post_init__(self) -> None:
        from tagray.config import ConfigError

        if min(self.max_image_bytes, self.max_json_bytes, self.max_pixels, self.max_query_terms, self.max_k, self.batch_size,
               self.tagger_replicas, self.searcher_replicas) < 1:
            raise ConfigError("max_image_bytes, max_json_bytes, max_pixels, max_query_terms, max_k, batch_size and the replica "
                              "counts must be ≥ 1")
        numbers = (self.batch_wait_s, self.tagger_cpus, self.num_gpus, self.searcher_cpus, self.group_retry_s,
                   self.index_refresh_s)
        if not all(math.isfinite(x) and x >= 0 for x in numbers) or min(self.torch_threads, self.search_threads,
                                                                         self.search_groups, self.max_offset) < 0:
            raise ConfigError("batch_wait_s, tagger_cpus, num_gpus, searcher_cpus, group_retry_s, index_refresh_s, "
                              "torch_threads, search_threads, search_groups and max_offset must be finite and ≥ 0")
        if not (math.isfinite(self.search_timeout_s) and self.search_timeout_s > 0):
            raise ConfigError("search_timeout_s must be finite and > 0")
        lifecycle = (self.health_check_period_s, self.health_check_timeout_s, self.graceful_shutdown_wait_loop_s)
        if not all(math.isfinite(x) and x > 0 for x in lifecycle):
            raise ConfigError("health_check_period_s, health_check_timeout_s and graceful_shutdown_wait_loop_s must be "
                              "finite and > 0")
        if not (math.isfinite(self.rate_limit_per_s) and self.rate_limit_per_s >= 0) or self.rate_limit_burst < 1:
            raise ConfigError("rate_limit_per_s must be finite and ≥ 0, rate_limit_burst ≥ 1")
        from tagray.serve.auth import parse_entries

        try:
            parse_entries(self.api_keys, "api_keys")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.feedback is not None:
            from tagray.data.feedback import FeedbackError, sqlite_path

            try:
                sqlite_path(self.feedback)
            except FeedbackError as e:
                raise ConfigError(str(e)) from None
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
    from tagray.features.backbone import build_backbone, read_weights

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
        import torch

        from tagray.heads.models import load_image_tagger

        self.cfg = cfg
        self.model_dir = model_dir
        self.head = load_image_tagger(model_dir, cfg.endpoint_url)
        identity = self.head.backbone or {}
        self.identity = identity
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        self.device = torch.device("cuda" if cfg.num_gpus and torch.cuda.is_available() else "cpu")
        # Features imported from elsewhere (`tagray features import`) have no backbone tagray can
        # run on an upload: such a model searches its index but refuses POST /v1/tag (409).
        self.computes_features = bool(identity) and identity.get("kind", "torchvision") != "external"
        if self.computes_features:
            self.backbone = load_backbone(identity, cfg.weights, cfg.endpoint_url).to(self.device)
        else:
            self.backbone = None
            log.warning("serve: %s was trained on features tagray cannot compute (%s); POST /v1/tag is refused",
                        model_dir, identity.get("name") or "no backbone identity")
        self.tagger = self.head.model.to(self.device).eval()
        self.tags = list(self.head.vocab.tags)
        # A calibrated model answers with its calibrated tags: only their P(z) is a probability
        # (an uncalibrated RLR P(z) = σ(s) of a rarely-tagged free tag is near 1 everywhere).
        calibrated = np.nonzero(np.asarray(self.head.calibrated))[0]
        self.candidates = calibrated if len(calibrated) else np.arange(len(self.tags))
        if self.computes_features:
            self.mean = torch.tensor(identity["mean"], device=self.device).view(1, 3, 1, 1) * 255
            self.std = torch.tensor(identity["std"], device=self.device).view(1, 3, 1, 1) * 255

    def decode(self, data: bytes) -> np.ndarray:
        if not self.computes_features:
            name = self.identity.get("name") or "features without a backbone identity"
            raise RequestError(409, f"this model was trained on external features ({name}) that tagray cannot compute "
                                    "from an image; POST /v1/tag is not available for it (GET /v1/search is)",
                               code="no_backbone")
        if len(data) > self.cfg.max_image_bytes:
            raise RequestError(413, f"image of {len(data)} bytes is over the limit of {self.cfg.max_image_bytes}")
        try:
            return decode(data, self.identity["image_size"], self.identity["resize_size"], self.cfg.max_pixels)
        except ImageError as e:
            raise RequestError(400, f"bad image: {e.reason}") from None

    def probabilities(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, S, S, 3) uint8 → (P(y=1|x), P(z=1|x)), each (B, T)."""
        import torch

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

    def query_vectors(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Decoded images → vectors in the index's space, for search by example (POST /v1/similar):
        `tagray.index.model.example_vector` of the backbone features — f = h(x) for the embedding
        head (seed 004: what its image index holds), x / ‖x‖ for a linear head (cosine)."""
        import torch

        from tagray.index.model import example_vector

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(np.stack(pixels))).to(self.device).permute(0, 3, 1, 2).float()
            features = self.backbone(x.sub_(self.mean).div_(self.std)).float().cpu().numpy()
        return example_vector(self.head, features)

    def tag(self, pixels: list[np.ndarray], ks: list[int], thresholds: list[float]) -> list[list[dict]]:
        """One model call for a batch of requests (each its own k and threshold)."""
        p_user, p_true = self.probabilities(np.stack(pixels))
        return [self.top_tags(pu, pt, k, th) for pu, pt, k, th in zip(p_user, p_true, ks, thresholds, strict=True)]

    def model_info(self) -> dict:
        metrics_uri = storage.join(self.model_dir, "metrics.json")
        metrics = json.loads(storage.read_text(metrics_uri, self.cfg.endpoint_url)) \
            if storage.exists(metrics_uri, self.cfg.endpoint_url) else {}
        return {
            "model": display_name(self.model_dir),  # the directory's name: no server paths in answers
            "head": self.head.config.head,
            "version": self.head.vocab.version,
            "tags": len(self.tags),
            "calibrated": bool(np.asarray(self.head.calibrated).any()),
            "tagging": self.computes_features,
            "device": str(self.device),  # the Tagger replica's torch device: "cpu" or "cuda"
            "backbone": {"name": self.identity.get("name"), "kind": self.identity.get("kind", "torchvision"),
                         "weights": display_name(self.identity.get("weights") or "") or None,
                         "weights_digest": self.identity.get("weights_digest"), "dim": self.identity.get("dim")},
            "training": {k: metrics.get(k) for k in ("train_images", "steps", "final_loss", "mean_pi", "user_tags", "seconds")
                         if k in metrics},
        }


def display_name(uri: str) -> str:
    """The last component of a path or URI (`/srv/models/rlr/` → `rlr`): what answers show
    instead of the server's own paths."""
    return os.path.basename(uri.split("?", 1)[0].rstrip("/")) if uri else ""


def check_uri(uri: object, buckets: tuple[str, ...]) -> tuple[str, str]:
    """An `s3://bucket/key` inside the configured buckets → (bucket, key); anything else →
    RequestError(400). The server never fetches http(s) URLs or local paths."""
    if not isinstance(uri, str) or not uri:
        raise RequestError(400, 'give the image as a multipart file, or JSON {"uri": "s3://bucket/key"}')
    if not uri.startswith("s3://"):
        raise RequestError(400, f"uri {shown(uri)} refused: only s3://bucket/key URIs in the configured buckets are "
                                "read (never http(s) URLs or local paths)", code="uri_refused")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if bucket not in buckets or not key:
        raise RequestError(400, f"uri {shown(uri)} refused: bucket {shown(bucket)} is not among the configured "
                                f"buckets ({', '.join(buckets) or 'none'})", code="uri_refused")
    return bucket, key


def store_failure(uri: str, e: OSError) -> RequestError:
    """An object store that failed → 504 (timed out), 503 (unreachable) or 502 (answered an error)."""
    text = str(e)
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        status, code, what = 504, "store_timeout", "timed out"
    elif any(w in lowered for w in ("couldn't connect", "could not connect", "connection refused", "unreachable",
                                    "curl error", "resolve host", "network")):
        status, code, what = 503, "store_unavailable", "is unreachable"
    else:
        status, code, what = 502, "store_error", "answered an error"
    first = text.splitlines()[0][:200] if text else type(e).__name__
    return RequestError(status, f"the object store holding {shown(uri)} {what}: {first}", code=code,
                        headers={"Retry-After": "5"} if status != 502 else None)


def fetch_uri(uri: str, cfg: ServeConfig) -> bytes:
    check_uri(uri, cfg.buckets)
    try:
        fs, path = storage.filesystem_for(uri, cfg.endpoint_url)
        info = fs.get_file_info(path)
        if info.type.name == "NotFound":
            raise RequestError(400, f"uri {shown(uri)}: no such object", code="no_such_object")
        if info.size is not None and info.size > cfg.max_image_bytes:
            raise RequestError(413, f"object {shown(uri)} of {info.size} bytes is over the limit of "
                                    f"{cfg.max_image_bytes}")
        return storage.read_bytes(uri, cfg.endpoint_url)
    except OSError as e:
        raise store_failure(uri, e) from None


def parse_date(value: str, name: str) -> str:
    """An ISO date (`2024-06-01`) or date-time (`2024-06-01T12:00:00`) of a query parameter,
    returned in ISO form; anything else → 422 naming the parameter."""
    import datetime

    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise RequestError(422, f"{name}: {shown(value)} is not an ISO date (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)",
                           code="invalid_date") from None
    return parsed.isoformat() if ("T" in value or " " in value) else parsed.date().isoformat()


def parse_filters(columns: list[str] | tuple[str, ...], user: str | None = None, taken_after: str | None = None,
                  taken_before: str | None = None, equals: tuple[tuple[str, str], ...] = (),
                  date_column: str | None = None, user_column: str = "user_id"):
    """Query parameters → `tagray.index.Filters`, refusing (422, naming it) a filter on a column
    the index did not keep (`columns`: the manifest columns it holds; `date_column`: the one
    taken_after / taken_before compare with, index.json's `date_column`) and bad dates."""
    from tagray.index import Filters

    date_column = date_column or "date_taken"
    wanted = ([user_column] if user is not None else []) + \
        ([date_column] if (taken_after, taken_before) != (None, None) else []) + [c for c, _ in equals]
    for column in wanted:
        if column not in columns:
            raise RequestError(422, f"filter on {shown(column)}: the index keeps no such column (kept: "
                                    f"{', '.join(columns) or 'none'}; rebuild it with `tagray index --columns …`)",
                               code="unknown_column")
    after = parse_date(taken_after, "taken_after") if taken_after is not None else None
    before = parse_date(taken_before, "taken_before") if taken_before is not None else None
    if after is not None and before is not None and after > before:
        raise RequestError(422, f"taken_after {after} is after taken_before {before}", code="invalid_date")
    return Filters(user=user, taken_after=after, taken_before=before, equals=tuple(equals))


def hit_dict(hit) -> dict:
    """A `tagray.index.Hit` as an answer's image."""
    return {"image_id": hit.image_id, "uri": hit.uri, "score": float(hit.score)}


class SearchService:
    """Multi-tag AND search over some shards of a model's index (tagray index): for a linear
    head, images ranked by the product of calibrated P(z=1|x) over the query tags (seed 001
    §5.3) — a probability, so `min_score` means the same for every query —; for the embedding
    head, by f·Σ v_w over any vocabulary words, tagged or not (seed 004). Also search by example
    (nearest stored vectors) and the stored image of an id.

    `shards`: the shard names this one serves (a Searcher group of the Serve app); None = all of
    them (`tagray search`). Hits of several services merge exactly with `tagray.index.merge_hits`
    (scores are comparable across shards: the same model scored every image)."""

    def __init__(self, model_dir: str, index_dir: str, cfg: ServeConfig, head=None,
                 shards: list[str] | None = None, info=None) -> None:
        from tagray.data.normalize import TagNormalizer
        from tagray.heads.embed_artifact import SavedEmbedHead
        from tagray.heads.models import load_image_tagger
        from tagray.index import ShardGroup, open_index
        from tagray.serve.index import WordIndex

        self.cfg, self.model_dir = cfg, model_dir
        self.head = head if head is not None else load_image_tagger(model_dir, cfg.endpoint_url)
        self.info = info if info is not None else open_index(index_dir, cfg.endpoint_url)  # one version
        self.shards = list(self.info.shards) if shards is None else list(shards)
        # checks the model and shards; a tag search scans with cfg.search_threads threads, from codes if cfg.scan_codes
        self.group = ShardGroup(self.info, self.shards, self.head, cfg.endpoint_url, threads=cfg.scan_threads,
                                codes=cfg.scan_codes)
        # the vectors search by example needs: the embed head's f, a linear index's normalised features
        self.has_vectors = self.info.kind == "embeddings" or bool(self.info.meta.get("vectors"))
        self.deleted = frozenset(self.info.tombstones())
        self.normalizer = TagNormalizer.from_identity(self.head.vocab.normalizer)
        self.words = WordIndex.of(self.head) if isinstance(self.head, SavedEmbedHead) else None
        self.score = "f·Σv (sum of the words' logits)" if self.words else "product of calibrated P(z=1|x)"

    @property
    def version(self) -> int:
        return int(self.info.version)

    def describe(self) -> dict:
        """What this service serves (for /v1/model and the Ingress's partial answers)."""
        return {"version": self.version, "kind": self.info.kind, "shards": list(self.shards),
                "index_shards": len(self.info.shards), "score": self.score}

    def image_bytes(self, image_id: str) -> bytes:
        """The bytes of an image these shards list (by its manifest uri), at most max_image_bytes."""
        uri = None if image_id in self.deleted else self.group.uri_of(image_id)
        if uri is None:
            raise RequestError(404, f"image {shown(image_id)} is not in the index (or has no uri)")
        uri = resolve(uri, self.cfg.base_dir)
        try:
            data = storage.read_bytes(uri, self.cfg.endpoint_url)
        except (FileNotFoundError, OSError):
            raise RequestError(404, f"image {shown(image_id)} could not be read") from None
        if len(data) > self.cfg.max_image_bytes:
            raise RequestError(413, f"image {shown(image_id)} is over {self.cfg.max_image_bytes} bytes")
        return data

    def terms(self, q: str | None) -> list[str]:
        terms = [t.strip() for t in (q or "").split(",") if t.strip()]
        if not terms:
            raise RequestError(422, "empty query: give q=tag1,tag2,…", code="empty_query")
        if len(terms) > self.cfg.max_query_terms:
            raise RequestError(422, f"{len(terms)} query terms; at most {self.cfg.max_query_terms}",
                               code="too_many_terms")
        return terms

    def check_k(self, k: int, offset: int = 0) -> int:
        if not 1 <= k <= self.cfg.max_k:
            raise RequestError(422, f"k must be in [1, {self.cfg.max_k}], got {k}")
        if not 0 <= offset <= self.cfg.max_offset:
            raise RequestError(422, f"offset must be in [0, {self.cfg.max_offset}], got {offset}")
        return k

    def columns(self, terms: list[str]) -> list[int]:
        """Query tags → the vocabulary's columns (normalised as the training tags were)."""
        columns = []
        for term in terms:
            tag = self.normalizer.normalize_tag(term)
            if tag is None or tag not in self.head.vocab.index:
                said = shown(term) + (f" (normalised: {shown(tag)})" if tag and tag != term else "")
                raise RequestError(422, f"unknown tag {said}: not in the model's vocabulary (GET /v1/tags)",
                                   code="unknown_term")
            columns.append(self.head.vocab.index[tag])
        return columns

    def query_vector(self, terms: list[str]) -> np.ndarray:
        """q = Σ_w v_w of an embed model's words (tagray/serve/index.py)."""
        from tagray.serve.index import UnknownWord

        try:
            return self.words.query_vector(terms)
        except UnknownWord as e:
            raise RequestError(422, f"unknown word {shown(e.word)}: not among the model's words",
                               code="unknown_term") from None

    def hits(self, terms: list[str], n: int, min_score: float | None = None, filters=None) -> list:
        """The best `n` hits of these shards for the AND of `terms` (`tagray.index.Hit`s). `min_score`:
        for a linear head the product of the tags' calibrated P(z=1|x), in [0, 1] (0: no cut); for the
        embed head f·q."""
        from tagray.config import ConfigError
        from tagray.index import Filters

        filters = filters or Filters()
        try:
            if self.words is not None:
                return self.group.search_vector(self.query_vector(terms), n, min_score=min_score, filters=filters,
                                                deleted=self.deleted)
            if min_score is not None and not 0 <= min_score <= 1:
                raise RequestError(422, f"min_score must be in [0, 1] for this model: it is a product of calibrated "
                                        f"probabilities P(z=1|x), got {min_score}", code="invalid_min_score")
            return self.group.search_tags(self.columns(terms), n, min_score=min_score or None, filters=filters,
                                          deleted=self.deleted)
        except ConfigError as e:
            raise RequestError(422, str(e)) from None

    def _vectors(self) -> None:
        if not self.has_vectors:
            raise RequestError(409, "this index was built without the feature vectors search by example needs; "
                                    "rebuild it with `tagray index` (similar vectors kept)", code="no_vectors")

    def similar_hits(self, vector: np.ndarray, n: int, min_score: float | None = None, filters=None,
                     exclude: str | None = None) -> list:
        """The `n` stored images nearest a query vector (search by example; inner product in the
        index's space: f·f' for the embed head, cosine of the features for a linear one), without
        `exclude`; `min_score` cuts on that similarity."""
        from tagray.config import ConfigError
        from tagray.index import Filters

        self._vectors()
        try:
            hits = self.group.similar(np.asarray(vector, np.float32), n, filters=filters or Filters(),
                                      deleted=self.deleted, exclude=exclude)
        except ConfigError as e:
            raise RequestError(422, str(e)) from None
        return [h for h in hits if min_score is None or h.score >= min_score]

    def vector_of(self, image_id: str) -> np.ndarray | None:
        """The stored vector of an image these shards hold (None: not here, or deleted)."""
        self._vectors()
        return None if image_id in self.deleted else self.group.vector_of(image_id)

    def search(self, terms: list[str], k: int, offset: int = 0, min_score: float | None = None,
               filters=None) -> list[dict]:
        """The answer of these shards alone (`tagray search`; one group of the Serve app answers
        `hits`, which the Ingress merges with the other groups' the same way)."""
        from tagray.index import merge_hits

        self.check_k(k, offset)
        return [hit_dict(h) for h in merge_hits([self.hits(terms, offset + k, min_score, filters)], k, offset)]
