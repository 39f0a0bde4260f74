"""A synthetic tagged-photo corpus, faithful to what the papers measured on Flickr tags.

Latent model (all rates recorded in `truth.json`):
- T concepts with Zipf-like popularity; users own events (`sets`) whose images draw
  most concepts from the event's small pool; about 2.4 concepts per image (NUS-WIDE).
- A present concept is tagged with its tagging likelihood π_t (logit-normal, median
  ≈ 0.2, clipped to [0.02, 0.9]: MIRFlickr/NUS-WIDE, seed 001 §3.4), sometimes in
  plural form, sometimes with a synonym as well; an absent concept is tagged falsely
  with rate ρ_t (log-uniform 0.3–1 %).
- Users have habits: how many free tags they add (events, places, styles), their
  camera make/model, year and award tags (non-image tags), Title-Case typing.
- True tags tend to come first in the list, false ones last (seed 001 Fig. 2).
- `groups` are concept-themed communities an image joins when the theme is present.
Images render each concept into a quadrant (render.py); `features_only` instead writes
features drawn from the same latent model (sum of concept directions plus noise).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagray import jsonio
from tagray.config import ConfigError, to_dict
from tagray.data import schema, storage
from tagray.data.render import Signature, encode_jpeg, make_signatures, render_image
from tagray.data.words import (
    AWARD_TAGS,
    CAMERAS,
    FREE_MULTIWORD,
    FREE_WORDS,
    SYNONYMS,
    YEARS,
    concept_words,
    plural,
)

log = logging.getLogger(__name__)

MAX_CONCEPTS_PER_IMAGE = 4  # one per quadrant


@dataclass(frozen=True)
class SynthConfig:
    images: int = 2000  # number of images N
    concepts: int = 40  # number of visual concepts T (each with a tag word)
    seed: int = 0  # everything is a deterministic function of the seed
    images_per_user: float = 20.0  # mean images per user (lognormal spread between users)
    images_per_set: float = 6.0  # mean images per set (one user's event)
    set_fraction: float = 0.8  # share of events that form a named set
    concepts_per_image: float = 2.4  # mean ground-truth concepts per image (NUS-WIDE: 2.4)
    event_pool: int = 3  # concepts in one event's pool
    event_share: float = 0.6  # chance a concept of an image comes from its event's pool
    popularity_zipf: float = 0.8  # concept popularity ∝ rank^-zipf
    pi_median: float = 0.2  # median tagging likelihood P(tag | concept present)
    pi_spread: float = 1.2  # standard deviation of logit(π) across concepts
    pi_min: float = 0.02  # tagging likelihoods are clipped to [pi_min, pi_max]
    pi_max: float = 0.9
    false_rate_min: float = 0.003  # per-concept false-tag rate ρ, log-uniform in [min, max]
    false_rate_max: float = 0.01
    plural_rate: float = 0.2  # share of tags written in plural form
    synonym_rate: float = 0.1  # chance a tagged concept also gets its synonym
    free_tags_mean: float = 2.5  # median over users of free (non-concept) tags per image
    title_case_users: float = 0.2  # share of users who type Title-Case tags
    groups_per_concept: int = 2  # themed groups per concept
    group_join_rate: float = 0.3  # chance an image joins a group of each concept it shows
    image_size: int = 128  # rendered JPEG side in pixels
    jpeg_quality: int = 90
    render_batch: int = 200  # images per Ray rendering task
    render_cpus: float = 1.0  # CPUs each rendering task reserves (less renders beside an app holding the others)
    feature_dim: int = 512  # features_only: dimension D
    feature_noise: float = 0.8  # features_only: noise norm relative to one concept's direction

    def __post_init__(self) -> None:
        if self.images < 1 or self.concepts < 2:
            raise ConfigError(f"need images ≥ 1 and concepts ≥ 2, got {self.images} and {self.concepts}")
        if not 0 < self.pi_min <= self.pi_median <= self.pi_max <= 1:
            raise ConfigError("need 0 < pi_min ≤ pi_median ≤ pi_max ≤ 1")
        if not 0 < self.false_rate_min <= self.false_rate_max < 1:
            raise ConfigError("need 0 < false_rate_min ≤ false_rate_max < 1")
        if not 1 <= self.concepts_per_image <= MAX_CONCEPTS_PER_IMAGE:
            raise ConfigError(f"concepts_per_image must be in [1, {MAX_CONCEPTS_PER_IMAGE}]")
        # each check is written so that NaN fails it too (every comparison with NaN is false)
        if not (self.images_per_user >= 1 and self.images_per_set >= 1):
            raise ConfigError(f"need images_per_user ≥ 1 and images_per_set ≥ 1, got {self.images_per_user}, "
                              f"{self.images_per_set}")
        shares = ("set_fraction", "event_share", "plural_rate", "synonym_rate", "title_case_users", "group_join_rate")
        outside = [f"{k}={getattr(self, k)}" for k in shares if not 0 <= getattr(self, k) <= 1]
        if outside:
            raise ConfigError(f"shares and rates must be in [0, 1], got {', '.join(outside)}")
        if not (self.popularity_zipf >= 0 and self.pi_spread >= 0 and self.free_tags_mean >= 0 and self.feature_noise >= 0):
            raise ConfigError("popularity_zipf, pi_spread, free_tags_mean and feature_noise must be ≥ 0")
        if min(self.event_pool, self.render_batch, self.feature_dim) < 1 or self.groups_per_concept < 0:
            raise ConfigError("need event_pool, render_batch, feature_dim ≥ 1 and groups_per_concept ≥ 0")
        if not self.render_cpus > 0:
            raise ConfigError(f"render_cpus must be > 0, got {self.render_cpus}")
        if self.image_size < 8 or not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"need image_size ≥ 8 pixels and jpeg_quality in [1, 95], got {self.image_size}, "
                              f"{self.jpeg_quality}")


@dataclass
class Corpus:
    """A generated corpus before it is written."""

    manifest: pa.Table
    label_rows: np.ndarray  # (L,) image index of each (image, concept) pair, sorted
    label_cols: np.ndarray  # (L,) concept index
    set_index: np.ndarray  # (N,) event index of each image
    signatures: list[Signature]
    truth: dict


class _Strings:
    """Interns tag strings so tags are handled as integer ids until the end."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.ids: dict[str, int] = {}

    def id(self, s: str) -> int:
        if s not in self.ids:
            self.ids[s] = len(self.values)
            self.values.append(s)
        return self.ids[s]

    def ids_of(self, strings) -> np.ndarray:
        return np.array([self.id(s) for s in strings], dtype=np.int64)


def _lists(rows: np.ndarray, values: pa.Array, n: int) -> pa.ListArray:
    """A ListArray of n rows from (row, value) pairs sorted by row."""
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _draw_labels(cfg: SynthConfig, rng, pool, set_of, popularity, lam: float):
    n = len(set_of)
    k = MAX_CONCEPTS_PER_IMAGE
    count = np.minimum(1 + rng.poisson(lam, n), k)
    from_pool = rng.random((n, k)) < cfg.event_share
    pool_pick = pool[set_of[:, None], rng.integers(0, cfg.event_pool, (n, k))]
    global_pick = rng.choice(cfg.concepts, size=(n, k), p=popularity)
    cand = np.where(from_pool, pool_pick, global_pick)
    cand[np.arange(k)[None, :] >= count[:, None]] = -1
    cand.sort(axis=1)
    dup = np.zeros_like(cand, dtype=bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    cand[dup] = -1
    return cand


def _calibrate_poisson(cfg: SynthConfig, popularity: np.ndarray) -> float:
    """λ of `1 + Poisson(λ)` concept slots whose mean after de-duplication is concepts_per_image."""
    rng = np.random.default_rng([cfg.seed, 99])
    sets = np.arange(20_000) // max(1, round(cfg.images_per_set))
    pool = rng.choice(cfg.concepts, size=(sets[-1] + 1, cfg.event_pool), p=popularity)
    lo, hi = 0.0, 8.0
    for _ in range(20):
        lam = (lo + hi) / 2
        mean = (_draw_labels(cfg, np.random.default_rng([cfg.seed, 98]), pool, sets, popularity, lam) >= 0).sum(1).mean()
        lo, hi = (lam, hi) if mean < cfg.concepts_per_image else (lo, lam)
    return (lo + hi) / 2


def generate(cfg: SynthConfig, out: str) -> Corpus:
    """The corpus latent model and manifest; images would live under `out`/images/."""
    n, t = cfg.images, cfg.concepts
    rng = np.random.default_rng(cfg.seed)
    words = concept_words(t)
    plurals = [plural(w) for w in words]
    synonyms = [SYNONYMS.get(w) for w in words]

    # Concepts: tagging likelihood π, false-tag rate ρ, popularity.
    logit = np.log(cfg.pi_median / (1 - cfg.pi_median)) + cfg.pi_spread * rng.standard_normal(t)
    pi = np.clip(1 / (1 + np.exp(-logit)), cfg.pi_min, cfg.pi_max)
    rho = np.exp(rng.uniform(np.log(cfg.false_rate_min), np.log(cfg.false_rate_max), t))
    popularity = (1.0 + rng.permutation(t)) ** -cfg.popularity_zipf
    popularity /= popularity.sum()
    signatures = make_signatures(t, rng)

    # Users and their events (sets); images are grouped by user, then event.
    n_users = max(3, round(n / cfg.images_per_user))
    weights = rng.lognormal(0, 0.8, n_users)
    per_user = rng.multinomial(n, weights / weights.sum())
    user_of = np.repeat(np.arange(n_users), per_user)
    new_event = rng.random(n) < 1 / cfg.images_per_set
    new_event[np.r_[0, np.cumsum(per_user)[:-1]][per_user > 0]] = True
    set_of = np.cumsum(new_event) - 1
    n_sets = int(set_of[-1]) + 1
    pool = rng.choice(t, size=(n_sets, cfg.event_pool), p=popularity)
    named_set = rng.random(n_sets) < cfg.set_fraction

    # Ground truth: deduplicated concept slots, (image, concept) pairs sorted by image.
    lam = _calibrate_poisson(cfg, popularity)
    cand = _draw_labels(cfg, rng, pool, set_of, popularity, lam)
    label_rows, slot = np.nonzero(cand >= 0)
    label_cols = cand[label_rows, slot]

    # User habits.
    free_rate = cfg.free_tags_mean * rng.lognormal(0, 1.0, n_users)
    title_case = rng.random(n_users) < cfg.title_case_users
    camera = rng.integers(0, len(CAMERAS), n_users)
    p_camera = rng.beta(0.6, 1.5, n_users)
    p_year = rng.beta(0.6, 1.5, n_users)
    base_year = rng.integers(0, len(YEARS) - 1, n_users)
    p_award = np.where(rng.random(n_users) < 0.15, 0.3, 0.01)

    strings = _Strings()
    concept_ids = strings.ids_of(words)
    plural_ids = strings.ids_of(plurals)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (image, string id, position key)

    # True tags: each present concept tagged with π; early in the list.
    tagged = rng.random(len(label_rows)) < pi[label_cols]
    rows, cols = label_rows[tagged], label_cols[tagged]
    use_plural = rng.random(len(rows)) < cfg.plural_rate
    keys = rng.uniform(0, 1.5, len(rows))
    parts.append((rows, np.where(use_plural, plural_ids[cols], concept_ids[cols]), keys))
    has_syn = np.array([s is not None for s in synonyms])[cols] & (rng.random(len(rows)) < cfg.synonym_rate)
    syn_ids = np.array([strings.id(s) if s else -1 for s in synonyms])
    parts.append((rows[has_syn], syn_ids[cols[has_syn]], keys[has_syn] + rng.uniform(0, 0.5, has_syn.sum())))

    # False tags: each absent concept with rate ρ; late in the list.
    n_false = rng.poisson(rho.sum(), n)
    f_rows = np.repeat(np.arange(n), n_false)
    f_cols = rng.choice(t, size=len(f_rows), p=rho / rho.sum())
    present = np.isin(f_rows * t + f_cols, label_rows * t + label_cols)
    f_rows, f_cols = f_rows[~present], f_cols[~present]
    use_plural = rng.random(len(f_rows)) < cfg.plural_rate
    parts.append((f_rows, np.where(use_plural, plural_ids[f_cols], concept_ids[f_cols]), rng.uniform(0.2, 3.0, len(f_rows))))

    # Free tags: words that name no concept, as many as each user's habit.
    taken = set(words) | set(plurals) | {s for s in synonyms if s}
    free = [w for w in FREE_WORDS if w not in taken] + [w.replace(" ", "%20") for w in FREE_MULTIWORD]
    free_ids = strings.ids_of(free)
    free_p = (1.0 + np.arange(len(free))) ** -0.7
    n_free = np.minimum(rng.poisson(free_rate[user_of]), 40)
    fr_rows = np.repeat(np.arange(n), n_free)
    parts.append((fr_rows, free_ids[rng.choice(len(free), len(fr_rows), p=free_p / free_p.sum())], rng.uniform(0, 2.5, len(fr_rows))))

    # Non-image tags: camera make/model, year, awards — per user habit.
    cam_ids = [strings.ids_of(c) for c in CAMERAS]
    has_cam = np.nonzero(rng.random(n) < p_camera[user_of])[0]
    for i, ids in enumerate(cam_ids):
        r = has_cam[camera[user_of[has_cam]] == i]
        for j, sid in enumerate(ids):
            parts.append((r, np.full(len(r), sid), rng.uniform(0.5, 2.5, len(r)) + 0.01 * j))
    year_ids = strings.ids_of(YEARS)
    r = np.nonzero(rng.random(n) < p_year[user_of])[0]
    parts.append((r, year_ids[base_year[user_of[r]] + rng.integers(0, 2, len(r))], rng.uniform(0.5, 2.5, len(r))))
    award_ids = strings.ids_of(AWARD_TAGS)
    r = np.nonzero(rng.random(n) < p_award[user_of])[0]
    parts.append((r, award_ids[rng.integers(0, len(AWARD_TAGS), len(r))], rng.uniform(1.0, 3.0, len(r))))

    # Assemble ordered tag lists: sort by (image, key), drop raw duplicates (first kept).
    rows = np.concatenate([p[0] for p in parts])
    sids = np.concatenate([p[1] for p in parts])
    keys = np.concatenate([p[2] for p in parts])
    order = np.lexsort((keys, rows))
    rows, sids = rows[order], sids[order]
    _, first = np.unique(rows * len(strings.values) + sids, return_index=True)
    first.sort()
    rows, sids = rows[first], sids[first]
    values = pa.array(strings.values, pa.string())
    titled = pa.array([s.title() for s in strings.values], pa.string())
    tag_values = pa.chunked_array([values, titled]).combine_chunks().take(
        pa.array(sids + len(strings.values) * title_case[user_of[rows]])
    )

    # Groups: concept-themed communities (plus a little noise).
    joins = rng.random(len(label_rows)) < cfg.group_join_rate
    g_rows = label_rows[joins]
    g_ids = label_cols[joins] * cfg.groups_per_concept + rng.integers(0, cfg.groups_per_concept, joins.sum())
    noise = np.nonzero(rng.random(n) < 0.05)[0]
    g_rows = np.concatenate([g_rows, noise])
    g_ids = np.concatenate([g_ids, rng.integers(0, t * cfg.groups_per_concept, len(noise))])
    order = np.lexsort((g_ids, g_rows))
    g_rows, g_ids = g_rows[order], g_ids[order]
    _, first = np.unique(g_rows * (t * cfg.groups_per_concept) + g_ids, return_index=True)
    g_rows, g_ids = g_rows[first], g_ids[first]
    group_names = pa.array([f"grp{g:05d}" for g in range(t * cfg.groups_per_concept)])

    width = max(6, len(str(n)))
    image_dir = storage.join(out, "images")
    image_ids = [f"img{i:0{width}d}" for i in range(n)]
    s_rows = np.nonzero(named_set[set_of])[0]
    manifest = pa.table(
        {
            "image_id": pa.array(image_ids),
            "user_id": pa.array([f"user{u:05d}" for u in range(n_users)]).take(pa.array(user_of)),
            "uri": pa.array([f"{image_dir}/{i}.jpg" for i in image_ids]),
            "tags": _lists(rows, tag_values, n),
            "labels": _lists(label_rows, pa.array(words).take(pa.array(label_cols)), n),
            "groups": _lists(g_rows, group_names.take(pa.array(g_ids)), n),
            "sets": _lists(
                s_rows,
                pa.array([f"user{user_of[i]:05d}/set{set_of[i]:06d}" for i in s_rows], pa.string()),
                n,
            ),
        }
    )
    truth = {
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "images": n,
        "users": int((per_user > 0).sum()),
        "sets": int(named_set.sum()),
        "concepts_per_image": float(len(label_rows) / n),
        "tags_per_image": float(len(rows) / n),
        "concepts": [
            {
                "tag": words[i],
                "plural": plurals[i],
                "synonym": synonyms[i],
                "pi": float(pi[i]),  # P(tag | concept present), singular or plural form
                "false_rate": float(rho[i]),  # P(tag | concept absent)
                "prior": float(popularity[i]),
                "signature": signatures[i].to_dict(),
            }
            for i in range(t)
        ],
    }
    return Corpus(manifest, label_rows, label_cols, set_of, signatures, truth)


def _render_chunk(
    start: int, concept_lists: list[list[int]], uris: list[str], signatures, cfg: SynthConfig, endpoint_url
) -> int:
    """Renders and writes one chunk of images (a Ray task); per-image seeds keep output
    independent of chunking."""
    for offset, (concepts, uri) in enumerate(zip(concept_lists, uris, strict=True)):
        rng = np.random.default_rng([cfg.seed, 7, start + offset])
        pixels = render_image(concepts, signatures, cfg.image_size, rng)
        storage.write_bytes(uri, encode_jpeg(pixels, cfg.jpeg_quality), endpoint_url)
    return len(uris)


def render_images(corpus: Corpus, cfg: SynthConfig, endpoint_url: str | None = None) -> int:
    """Renders every image with Ray tasks (one per `render_batch` images); returns the count."""
    import ray
    from tqdm import tqdm

    n = corpus.manifest.num_rows
    offsets = np.searchsorted(corpus.label_rows, np.arange(n + 1))
    concept_lists = [corpus.label_cols[offsets[i] : offsets[i + 1]].tolist() for i in range(n)]
    uris = corpus.manifest.column("uri").to_pylist()
    task = ray.remote(_render_chunk).options(num_cpus=cfg.render_cpus)
    sigs = ray.put(corpus.signatures)
    pending = [
        task.remote(s, concept_lists[s : s + cfg.render_batch], uris[s : s + cfg.render_batch], sigs, cfg, endpoint_url)
        for s in range(0, n, cfg.render_batch)
    ]
    done = 0
    with tqdm(total=n, desc="render images", unit="img") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            k = ray.get(ready[0])
            done += k
            bar.update(k)
    return done


def write_features(corpus: Corpus, cfg: SynthConfig, uri: str, endpoint_url: str | None = None) -> None:
    """Features from the latent model: x = Σ_t a_t μ_t + event style + noise, written in
    row groups so a million rows never sit in memory at once."""
    d, n = cfg.feature_dim, corpus.manifest.num_rows
    rng = np.random.default_rng([cfg.seed, 11])
    mu = (rng.standard_normal((cfg.concepts, d)) / np.sqrt(d)).astype(np.float32)  # unit-norm-ish
    style = (rng.standard_normal((int(corpus.set_index.max()) + 1, d)) / np.sqrt(d)).astype(np.float32)
    identity = {"name": "synthetic-latent", "seed": cfg.seed, "dim": d, "noise": cfg.feature_noise}
    out_schema = schema.with_backbone_identity(schema.features_schema(d), identity)
    fs, path = storage.filesystem_for(uri, endpoint_url)
    if isinstance(fs, pa.fs.LocalFileSystem):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    ids = corpus.manifest.column("image_id")
    chunk = max(1024, min(65_536, 16_000_000 // cfg.concepts))  # keeps the chunk × T weights small
    starts = np.searchsorted(corpus.label_rows, np.arange(0, n + chunk, chunk).clip(max=n))
    with pq.ParquetWriter(path, out_schema, filesystem=fs) as writer:
        for k, lo in enumerate(range(0, n, chunk)):
            hi = min(n, lo + chunk)
            crng = np.random.default_rng([cfg.seed, 12, lo])
            a, b = starts[k], starts[k + 1]
            # (chunk, T) visual prominence of each present concept, then x = A μ (BLAS).
            weights = np.zeros((hi - lo, cfg.concepts), dtype=np.float32)
            weights[corpus.label_rows[a:b] - lo, corpus.label_cols[a:b]] = crng.uniform(0.7, 1.3, b - a)
            x = crng.standard_normal((hi - lo, d), dtype=np.float32)
            x *= cfg.feature_noise / np.sqrt(d)
            x += weights @ mu
            x += (0.5 * cfg.feature_noise) * style[corpus.set_index[lo:hi]]
            feats = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)
            writer.write_table(pa.table({"image_id": ids.slice(lo, hi - lo), "feature": feats}, schema=out_schema))


def synthesize(
    cfg: SynthConfig, out: str, features_only: bool = False, endpoint_url: str | None = None
) -> dict:
    """Generates and writes a corpus under `out` (local dir or s3:// prefix): manifest.parquet,
    truth.json, and images/*.jpg or (features_only) features.parquet. Returns what was written."""
    t0 = time.perf_counter()
    storage.makedirs(out, endpoint_url)
    corpus = generate(cfg, out)
    written = {"manifest": storage.join(out, "manifest.parquet"), "truth": storage.join(out, "truth.json")}
    if features_only:
        written["features"] = storage.join(out, "features.parquet")
        write_features(corpus, cfg, written["features"], endpoint_url)
        corpus.truth["rendered"] = False
    else:
        written["images"] = storage.join(out, "images")
        render_images(corpus, cfg, endpoint_url)
        corpus.truth["rendered"] = True
    schema.write_manifest(corpus.manifest, written["manifest"], endpoint_url)
    storage.write_text(written["truth"], jsonio.dumps(corpus.truth, written["truth"], indent=1), endpoint_url)
    log.info("synth: %d images in %.1fs → %s", cfg.images, time.perf_counter() - t0, out)
    return {
        **written,
        "num_images": cfg.images,
        "num_users": corpus.truth["users"],
        "seconds": time.perf_counter() - t0,
    }
