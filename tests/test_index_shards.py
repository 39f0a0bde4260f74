"""The sharded index (tagray/index/, issue 15 parts 2 and 4): built on a real local Ray (Ray Data
actor pool), real Parquet and faiss, one build on S3 (moto's server over HTTP). Sharded answers
equal the unsharded ones and a brute-force numpy ranking from the head's own probabilities;
appends leave existing shard files byte-identical; deletes hide, compaction removes; a build that
fails mid-way leaves the index at its old version and a re-run completes; bad input is named."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tagray import cli
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import read_manifest
from tagray.features import store
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.embed_artifact import SavedEmbedHead, save_embed_head
from tagray.heads.embedding import EmbedConfig, TagMLP
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import LinearTagger
from tagray.heads.models import load_image_tagger
from tagray.heads.targets import prepare_vocabulary
from tagray.index import Filters, Hit, ShardGroup, layout, merge_hits, open_index, search_all
from tagray.index.build import runs_of, split_runs
from tests.corpora import split_corpus

IMAGES, DIM = 600, 16


# --- pure parts ----------------------------------------------------------------------------------

def test_a_read_only_batch_becomes_a_tensor_without_torchs_warning_and_a_writable_one_is_shared():
    import warnings

    from tagray.index.model import float_tensor

    frozen = np.arange(12, dtype=np.float32).reshape(3, 4)
    frozen.flags.writeable = False  # as Ray Data hands a batch over from Arrow
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy's "not writable" UserWarning fails this
        t = float_tensor(frozen)
    assert t.dtype == torch.float32 and np.array_equal(t.numpy(), frozen)
    mine = np.ones((2, 3), np.float32)
    assert np.shares_memory(float_tensor(mine).numpy(), mine)  # no copy where none is needed
    assert float_tensor(np.ones((2, 3), np.float64)).dtype == torch.float32


def test_top_rows_is_the_exact_top_n_with_ties_broken_by_lower_index():
    rng = np.random.default_rng(0)
    for _ in range(200):
        total = rng.integers(-4, 1, size=rng.integers(1, 40)).astype(np.float32)  # many ties
        total[rng.random(len(total)) < 0.2] = -np.inf
        n = int(rng.integers(1, 45))
        want = [i for i in np.lexsort((np.arange(len(total)), -total)) if np.isfinite(total[i])][:n]
        assert layout.top_rows(total, n).tolist() == want


def test_a_float16_pattern_shifted_into_float32_is_its_magnitude_scaled_by_2_to_the_minus_80():
    """_scan's premise, for every float16 x ≤ 0: bits << 13 read as float32 is |x|·2⁻⁸⁰ exactly for
    normal x and +0, and above it by at most 2⁻¹⁵ (unscaled) for subnormals and −0."""
    patterns = np.concatenate([np.arange(0x8000, 0xFC00, dtype=np.uint16), np.zeros(1, np.uint16)])  # −0 … −65504, +0
    x = patterns.view(np.float16).astype(np.float64)
    got = (patterns.astype(np.uint32) << 13).view(np.float32).astype(np.float64) / 2.0**-80
    normal = (np.abs(x) >= 2.0**-14) | (patterns == 0)
    assert np.array_equal(got[normal], np.abs(x[normal]))
    over = got[~normal] - np.abs(x[~normal])
    assert over.min() > 0 and over.max() <= 2.0**-15 and (~normal).sum() == 1024  # the 1023 subnormals and −0


def test_coarse_codes_bound_every_float16_magnitude_from_below_as_tightly_as_their_step_allows():
    """_scan_codes' premise, for every float16 pattern: code/32 ≤ |x| for x ≤ 0 (so a sum of codes
    never exceeds 32× the magnitude of the sum), the largest such code up to 255; no bound (0) for
    +0, positive values and NaN."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    x = patterns.view(np.float16).astype(np.float64)
    codes = layout.coarse_codes(patterns.view(np.float16).reshape(1, -1))[0].astype(np.float64)
    nonpositive = x <= 0
    assert np.all(codes[nonpositive] / 32 <= -x[nonpositive])
    below_cap = nonpositive & (codes < 255)
    assert np.all((codes[below_cap] + 1) / 32 > -x[below_cap])  # the largest code that is a bound
    assert codes[x <= -255 / 32].min() == 255 and np.all(codes[~nonpositive] == 0)


@pytest.mark.parametrize("path", ["candidates", "scan", "codes"])
def test_top_and_equals_summing_every_image_on_large_shards_with_ties_masks_and_zeros(monkeypatch, path):
    """top_and's bound from a sample, its candidates (tag by tag: float16 patterns against the
    bound; or a bound on every sum: `_scan`'s from the patterns, `_scan_codes`' from the coarse
    codes) and top_rows' sampled threshold give exactly the rows and sums of summing and ranking
    every image, on shards big enough to take those paths: rare and common tags, many ties, zeros
    (+0 and −0), subnormals, masks."""
    monkeypatch.setattr(layout, "SAMPLED_ABOVE", 1000)  # the sampled paths on small arrays too
    monkeypatch.setattr(layout, "SAMPLE_BLOCK", 8)  # samples spread over the small arrays
    monkeypatch.setattr(layout, "SCAN_CHUNK", 4096)  # several chunks, the last one short
    monkeypatch.setattr(layout, "PART_ROWS_AT_LEAST", 4096)  # threads split these small shards too
    monkeypatch.setattr(layout, "CANDIDATES_AT_MOST", 1)  # candidates however many the bound keeps
    rng = np.random.default_rng(3)
    took = {"sampled": 0, "scanned": 0}
    bound, scan = layout._sampled_bound, layout._scan_codes if path == "codes" else layout._scan

    def counting_bound(*a):
        out = bound(*a)
        took["sampled"] += out is not None
        return out

    def counting_scan(*a):
        took["scanned"] += 1
        return scan(*a)

    monkeypatch.setattr(layout, "_sampled_bound", counting_bound)
    monkeypatch.setattr(layout, "_scan_codes" if path == "codes" else "_scan", counting_scan)
    pool = layout._pool
    monkeypatch.setattr(layout, "_pool", lambda threads: took.__setitem__("split", threads) or pool(threads))
    if path != "candidates":
        monkeypatch.setattr(layout, "_candidates", lambda *a: None)
    for trial in range(90):
        n_img, tags = int(rng.integers(5_000, 40_000)), 6
        scale = rng.choice([0.5, 4.0, 20.0], tags)  # near-certain, mid and rare tags
        n = int(rng.integers(1, 60))
        if trial % 4 == 1:  # fewer than n images above a common value: the top n ends on the bound itself
            levels = np.full((n_img, tags), -8.0)
            picked = rng.choice(n_img, min(n_img, 130 * n), replace=False)
            levels[picked] = -3.0  # the sample's n-th largest: the bound
            levels[picked[: n // 2 + 1]] = -0.5
            log_p = layout.to_layout(levels)
        elif trial % 2:  # a few levels: sums and the sampled bound land exactly on stored values
            log_p = layout.to_layout(rng.choice([0.0, -0.5, -1.0, -2.0, -3.0, -8.0], (n_img, tags)))
        else:
            log_p = layout.to_layout(-rng.exponential(scale, (n_img, tags)))
        log_p[:, rng.random(n_img) < 0.05] = np.float16(-2.0)  # ties across tags
        log_p[0, rng.random(n_img) < 0.01] = np.float16(-0.0)
        log_p[1, rng.random(n_img) < 0.01] = np.float16(0.0)
        log_p[2, rng.random(n_img) < 0.01] = np.float16(-3e-6)  # subnormal
        cols = [int(c) for c in rng.choice(tags, int(rng.integers(1, 4)), replace=trial % 7 == 0)]
        mask = rng.random(n_img) < rng.choice([0.01, 0.03, 0.5, 1.0]) if trial % 3 else None
        total = layout.and_scores(log_p, cols)
        if mask is not None:
            total[~mask] = -np.inf
        want = [i for i in np.lexsort((np.arange(n_img), -total)) if np.isfinite(total[i])][:n]
        codes = layout.coarse_codes(log_p) if path == "codes" else None
        rows, sums = layout.top_and(log_p, cols, n, mask, codes=codes)
        assert rows.tolist() == want, (trial, cols, n)
        assert np.array_equal(sums, total[want])
        threaded = layout.top_and(log_p, cols, n, mask, threads=3, codes=codes)  # the scan in contiguous parts
        assert threaded[0].tolist() == want and np.array_equal(threaded[1], sums)
        assert layout.top_rows(total, n).tolist() == want
    assert took["sampled"] > 30  # the sampled bound was taken, not summing every image
    assert took.get("split") == 3 or path == "candidates"  # the threaded scans ran in 3 parts
    assert (took["scanned"] >= took["sampled"]) if path != "candidates" else (took["scanned"] < took["sampled"] / 2)


@pytest.mark.parametrize("path", ["candidates", "scan", "codes"])
@pytest.mark.parametrize("cols", [[0, 1], [2, 1], [1, 0, 2]])
def test_top_and_keeps_the_image_whose_sum_is_exactly_the_bound_with_minus_zero_and_subnormals(monkeypatch, path, cols):
    """The top n lie in the sample and the n-th of them sums exactly to the bound, through −0 and a
    subnormal (values _scan's shift makes larger in magnitude): it must still be found; and with
    the coarse codes, whose bound is loosest exactly there, too."""
    monkeypatch.setattr(layout, "SAMPLED_ABOVE", 1000)
    monkeypatch.setattr(layout, "SAMPLE_BLOCK", 8)
    if path != "candidates":
        monkeypatch.setattr(layout, "_candidates", lambda *a: None)
    n_img, n = 20_000, 12
    levels = np.full((n_img, 3), -8.0)
    top = layout._sampled(np.arange(n_img))[:n]
    levels[top[:-1]] = -0.05 * np.arange(1, n)[:, None]  # distinct, all above the last one's sum
    log_p = layout.to_layout(levels)
    log_p[:, top[-1]] = np.array([-0.0, -2.0, -3e-6], np.float16)  # −0, −2, a subnormal
    total = layout.and_scores(log_p, cols)
    want = [int(i) for i in np.lexsort((np.arange(n_img), -total))[:n]]
    assert want[-1] == top[-1]
    rows, sums = layout.top_and(log_p, cols, n, codes=layout.coarse_codes(log_p) if path == "codes" else None)
    assert rows.tolist() == want and np.array_equal(sums, total[want])


def test_a_scan_is_split_over_threads_only_in_parts_of_at_least_two_million_images():
    calls = []

    def part(lo: int, hi: int) -> list[np.ndarray]:
        calls.append((lo, hi))
        return [np.arange(lo, hi, 500_000)]

    for size, threads, want in ((1_000_000, 2, 1), (4_000_000, 4, 1), (4_194_304, 4, 2), (10_000_000, 2, 2),
                                (10_000_000, 8, 4)):
        calls.clear()
        rows = layout._in_parts(size, layout.SCAN_CHUNK, threads, part)
        assert len(calls) == want, (size, threads)
        assert calls[0][0] == 0 and calls[-1][1] == size and all(a[1] == b[0] for a, b in zip(calls[:-1], calls[1:], strict=True))
        assert np.array_equal(rows, np.concatenate([np.arange(lo, hi, 500_000) for lo, hi in calls]))


def test_split_runs_cuts_selected_rows_into_contiguous_near_equal_parts():
    runs = [(0, a, b) for a, b in runs_of(np.array([1, 1, 0, 1, 1, 1, 0, 0, 1], bool))] + [(1, 0, 5)]
    assert runs[:3] == [(0, 0, 2), (0, 3, 6), (0, 8, 9)]
    for k in (1, 2, 3, 4, 11, 20):
        parts = split_runs(runs, k)
        flat = [(f, r) for p in parts for f, a, b in p for r in range(a, b)]
        assert flat == [(f, r) for f, a, b in runs for r in range(a, b)]  # every row once, in order
        sizes = [sum(b - a for _, a, b in p) for p in parts]
        assert max(sizes) - min(sizes) <= 1 and len(parts) == min(k, 11)


def test_merge_hits_orders_by_score_then_row_and_pages():
    a = [Hit("a", 0.5, None, 3), Hit("b", 0.9, None, 7)]
    b = [Hit("c", 0.5, None, 1), Hit("d", 0.1, None, 0)]
    assert [h.image_id for h in merge_hits([a, b], 3)] == ["b", "c", "a"]
    assert [h.image_id for h in merge_hits([a, b], 2, offset=2)] == ["a", "d"]


def test_int8_codes_lose_ranking_against_float16_and_say_how_much():
    rng = np.random.default_rng(1)
    log_p = np.log(rng.beta(0.3, 2.0, size=(8, 5000)).clip(1e-9)).astype(np.float16)
    queries = [list(rng.choice(8, m, replace=False)) for m in (1, 2, 3) for _ in range(10)]
    loss = layout.quantisation_loss(log_p, queries, k=20)
    assert 0 < loss["recall_at_k"] <= 1 and loss["bytes_per_image_tag"] == {"float16": 2, "int8": 1}
    exact = layout.quantisation_loss(log_p.astype(np.float32).astype(np.float16), queries[:1], k=20)
    assert exact["queries"] == 1


def test_an_old_single_directory_index_breaks_ties_by_row_as_the_shards_do():
    """Equal sums (float16 rows make them common) rank by row, here and in layout.top_and: the
    order argpartition leaves them in differs between numpy builds and CPUs."""
    from tagray.serve.index import PredictionIndex

    log_p = np.log(np.array([[0.5, 0.9, 0.5, 0.9, 0.5, 0.1, 0.5]], dtype=np.float32)).astype(np.float16)
    index = PredictionIndex(log_p, [f"i{r}" for r in range(7)], [None] * 7, {})
    assert [i for i, _, _ in index.search([0], 4)] == ["i1", "i3", "i0", "i2"]
    assert [i for i, _, _ in index.search([0], 7)] == ["i1", "i3", "i0", "i2", "i4", "i6", "i5"]
    # many ties at every rank, large enough for numpy's vectorised partition
    rng = np.random.default_rng(0)
    log_p = np.log(rng.choice([0.2, 0.4, 0.6, 0.8], size=(2, 20_000))).astype(np.float16)
    index = PredictionIndex(log_p, [f"i{r}" for r in range(20_000)], [None] * 20_000, {})
    for cols in ([0], [0, 1]):
        total = log_p[cols].astype(np.float32).sum(0)
        want = np.lexsort((np.arange(20_000), -total))[:500]
        assert [i for i, _, _ in index.search(cols, 500)] == [f"i{r}" for r in want]


def test_an_old_single_directory_index_is_read_as_one_shard(tmp_path):
    """Indexes of earlier versions (serve/index.py's save_prediction_index, still what `tagray demo`
    writes) search the same through the new API; appends to them ask for a rebuild."""
    from tagray.index.build import delete
    from tagray.serve.index import build_prediction_index, save_prediction_index

    corpus = split_corpus(tmp_path, 400, seed=2, feature_dim=DIM)
    model = _linear_model(corpus, tmp_path / "lr", seed=1)
    head = load_image_tagger(model)
    features, _ = store.read_features(corpus["features"])
    old = build_prediction_index(head, features, read_manifest(corpus["manifest"]), model)
    save_prediction_index(old, str(tmp_path / "old"))
    info = open_index(str(tmp_path / "old"))
    assert info.legacy and info.version == 0
    for cols in ([0], [1, 2]):
        want = [(i, s) for i, _, s in old.search(cols, 10)]
        got = [(h.image_id, h.score) for h in search_all(info, head, columns=cols, k=10)]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert np.allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-6)
    with pytest.raises(Exception, match="single-directory index of an older tagray cannot take deletes"):
        delete(str(tmp_path / "old"), [old.image_ids[0]])


# --- fixtures ------------------------------------------------------------------------------------

def _with_dates(manifest: str, out: Path) -> str:
    """The manifest plus a date_taken column (what importers keep): pq, since write_manifest keeps
    only the contract's columns."""
    table = read_manifest(manifest)
    days = np.random.default_rng(7).integers(0, 365, table.num_rows)
    dates = [f"2023-{1 + d // 31 % 12:02d}-{1 + d % 28:02d}T{d % 24:02d}:00:00" for d in days]
    path = out / "manifest_dated.parquet"
    pq.write_table(table.append_column("date_taken", pa.array(dates, pa.string())), path)
    return str(path)


def _linear_model(corpus: dict, out: Path, seed: int) -> str:
    normalizer = TagNormalizer(NormalizerConfig(lemmatize=False))
    vocab = prepare_vocabulary(read_manifest(corpus["manifest"]), normalizer)
    _, identity = store.read_features(corpus["features"])
    torch.manual_seed(seed)
    model = LinearTagger(DIM, len(vocab))
    with torch.no_grad():
        model.linear.weight.normal_(0, 1.0)
        model.linear.bias.normal_(-1, 1.0)
        model.beta.normal_(0, 0.5)
    save_head(SavedHead(model, vocab, HeadConfig(head="lr"), identity, np.ones(len(vocab), np.int64),
                        np.ones(len(vocab), bool)), str(out))
    return str(out)


def _embed_model(corpus: dict, out: Path, seed: int) -> str:
    normalizer = TagNormalizer(NormalizerConfig(lemmatize=False))
    vocab = prepare_vocabulary(read_manifest(corpus["manifest"]), normalizer)
    _, identity = store.read_features(corpus["features"])
    torch.manual_seed(seed)
    mlp = TagMLP(DIM, (12,), 8)
    vectors = torch.randn(len(vocab), 8)
    save_embed_head(SavedEmbedHead(mlp, vectors, list(vocab.tags), vocab, EmbedConfig(hidden=(12,), word_dim=8), identity,
                                   np.ones(len(vocab), np.int64), np.zeros(len(vocab), bool), "random"), str(out))
    return str(out)


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    corpus = split_corpus(out, IMAGES, seed=4, feature_dim=DIM)
    corpus["dated"] = _with_dates(corpus["manifest"], out)
    corpus["lr"] = _linear_model(corpus, out / "lr", seed=0)
    corpus["embed"] = _embed_model(corpus, out / "embed", seed=0)
    return corpus


def _index(*argv: str) -> int:
    return cli.main(["index", *argv])


def _build(world, model: str, out: Path, *extra: str, features: str | None = None) -> str:
    assert _index("--model", world[model], "--features", features or world["features"], "--manifest", world["dated"],
                  "--out", str(out), *extra) == 0
    return str(out)


def _truth_rows(world) -> tuple[list[str], np.ndarray]:
    table, _ = store.read_features(world["features"])
    x = table.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    return table.column("image_id").to_pylist(), x


def _brute_tags(world, head, columns: list[int], keep: np.ndarray) -> list[tuple[str, float, int]]:
    """Π P(z=1|x) from the head's own probabilities, stored as the layout stores them."""
    ids, x = _truth_rows(world)
    _, log_true = head.model.probabilities(torch.from_numpy(x))
    lp = log_true.detach().numpy().clip(-60, 0).astype(np.float16)
    total = lp[:, columns[0]].astype(np.float32)
    for c in columns[1:]:
        total += lp[:, c]
    order = [i for i in np.lexsort((np.arange(len(ids)), -total.astype(np.float64))) if keep[i]]
    return [(ids[i], float(np.exp(np.float64(total[i]))), i) for i in order]


def _masks(world) -> dict[str, tuple[Filters, np.ndarray]]:
    ids, _ = _truth_rows(world)
    m = pq.read_table(world["dated"]).to_pylist()
    by = {r["image_id"]: r for r in m}
    user = by[ids[5]]["user_id"]
    return {
        "none": (Filters(), np.ones(len(ids), bool)),
        "user": (Filters(user=user), np.array([by[i]["user_id"] == user for i in ids])),
        "dates": (Filters(taken_after="2023-03-01", taken_before="2023-06-15"),
                  np.array([by[i]["date_taken"] >= "2023-03-01" and by[i]["date_taken"][:10] <= "2023-06-15" for i in ids])),
    }


def _key(hits: list[Hit]) -> list[tuple[str, float, int]]:
    return [(h.image_id, h.score, h.row) for h in hits]


# --- exactness -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_sharded_tag_search_equals_unsharded_and_brute_force(world, tmp_path):
    head = load_image_tagger(world["lr"])
    indexes = {k: _build(world, "lr", tmp_path / f"k{k}", "--shards", str(k)) for k in (1, 2, 4)}
    infos = {k: open_index(v) for k, v in indexes.items()}
    assert [len(infos[k].shards) for k in (1, 2, 4)] == [1, 2, 4]
    assert infos[4].columns == ("user_id", "date_taken") and infos[4].version == 1
    shard = json.loads((tmp_path / "k4" / "shard-00002" / "shard.json").read_text())
    assert shard["images"] == IMAGES // 4 and shard["first_row"] == IMAGES // 2 and shard["last_row"] == 3 * IMAGES // 4 - 1
    assert shard["weights_digest"] == infos[4].meta["weights_digest"] and shard["layout"] == layout.LAYOUT
    rng = np.random.default_rng(3)
    tags = len(head.vocab)
    for name, (filters, keep) in _masks(world).items():
        for m in (1, 2, 3):
            for _ in range(4):
                cols = [int(c) for c in rng.choice(tags, m, replace=False)]
                brute = _brute_tags(world, head, cols, keep)
                for offset in (0, 7):
                    got = {k: _key(search_all(infos[k], head, columns=cols, k=15, offset=offset, filters=filters))
                           for k in (1, 2, 4)}
                    assert got[1] == got[2] == got[4], (name, cols, offset)
                    assert got[1] == brute[offset : offset + 15], (name, cols, offset)
    # the whole-index bridge (serve/index.load_any_index, for callers not yet on tagray.index) agrees
    from tagray.serve.index import load_any_index

    whole = load_any_index(indexes[4])
    sharded = search_all(infos[1], head, columns=[2, 3], k=10)
    assert [i for i, _, _ in whole.search([2, 3], 10)] == [h.image_id for h in sharded]
    assert np.allclose([s for _, _, s in whole.search([2, 3], 10)], [h.score for h in sharded], rtol=1e-6)
    # a Searcher's service scans with ServeConfig.search_threads threads (not its reserved CPUs): the same answer
    from tagray.serve.service import SearchService, ServeConfig

    svc = SearchService(world["lr"], indexes[1], ServeConfig(model=world["lr"], search_threads=3))
    assert svc.group.threads == 3
    assert _key(svc.hits([head.vocab.tags[2], head.vocab.tags[3]], 10)) == _key(sharded)
    # … and holds its shards' coarse codes (ServeConfig.scan_codes, on by default), or none when told not to
    shard = svc.group.shards[0]
    assert shard.codes.dtype == np.uint8 and np.array_equal(shard.codes, layout.coarse_codes(shard.log_p))
    lean = SearchService(world["lr"], indexes[1], ServeConfig(model=world["lr"], scan_codes=False))
    assert lean.group.shards[0].codes is None
    assert _key(lean.hits([head.vocab.tags[2], head.vocab.tags[3]], 10)) == _key(sharded)
    # min_score: the product cut-off keeps exactly the brute-force hits at or above it
    cols = [0, 1]
    brute = _brute_tags(world, head, cols, np.ones(IMAGES, bool))
    cut = brute[9][1]
    for k in (1, 4):
        got = _key(search_all(infos[k], head, columns=cols, k=50, min_score=cut))
        assert got == [b for b in brute[:50] if b[1] >= cut]
    # search by example (normalised features): the same over K, own image excluded, brute-force order
    ids, x = _truth_rows(world)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn[11]
    sims[11] = -np.inf
    want = [ids[i] for i in np.argsort(-sims, kind="stable")[:10]]
    for k in (1, 2, 4):
        assert [h.image_id for h in search_all(infos[k], head, similar=ids[11], k=10)] == want


@pytest.mark.integration
def test_sharded_embed_search_equals_unsharded_and_brute_force(world, tmp_path):
    head = load_image_tagger(world["embed"])
    infos = {k: open_index(_build(world, "embed", tmp_path / f"e{k}", "--shards", str(k))) for k in (1, 2, 4)}
    assert infos[2].kind == "embeddings" and infos[2].meta["factory"] == "flat"
    ids, x = _truth_rows(world)
    with torch.inference_mode():
        f = head.mlp(torch.from_numpy(x)).numpy()
    rng = np.random.default_rng(5)
    for name, (filters, keep) in _masks(world).items():
        for m in (1, 2, 3):
            q = head.vectors[rng.choice(len(head.vocab), m, replace=False)].sum(0).numpy()
            scores = f @ q
            order = [i for i in np.lexsort((np.arange(IMAGES), -scores)) if keep[i]]
            for offset in (0, 5):
                got = {k: search_all(infos[k], head, vector=q, k=12, offset=offset, filters=filters) for k in (1, 2, 4)}
                assert _key(got[1]) == _key(got[2]) == _key(got[4]), (name, m, offset)
                assert [h.image_id for h in got[1]] == [ids[i] for i in order[offset : offset + 12]]
                assert np.allclose([h.score for h in got[1]], scores[order[offset : offset + 12]], rtol=1e-5, atol=1e-5)
    # similar by image_id in f-space, across groups: the holder gives the vector, every group searches
    info = infos[4]
    groups = [ShardGroup(info, [s], head) for s in info.shards]
    holder = next(g for g in groups if g.holds(ids[3]))
    v = holder.vector_of(ids[3])
    assert np.allclose(v, f[3], atol=1e-5) and holder.uri_of(ids[3]) is not None
    merged = merge_hits([g.similar(v, 8, exclude=ids[3]) for g in groups], 8)
    scores = f @ f[3]
    scores[3] = -np.inf
    assert [h.image_id for h in merged] == [ids[i] for i in np.argsort(-scores, kind="stable")[:8]]
    assert [h.image_id for h in merged] == [h.image_id for h in search_all(info, head, similar=ids[3], k=8)]


@pytest.mark.integration
def test_ivf_pq_factory_trains_once_and_approximates_the_exact_index(world, tmp_path):
    head = load_image_tagger(world["embed"])
    exact = open_index(_build(world, "embed", tmp_path / "flat", "--shards", "2"))
    approx = open_index(_build(world, "embed", tmp_path / "ivf", "--shards", "2", "--factory", "IVF4,PQ4x4",
                               "--train-sample", "400", "--nprobe", "3"))
    assert approx.meta["trained"] == "trained-v1.faiss" and (tmp_path / "ivf" / "trained-v1.faiss").exists()
    assert approx.meta["nprobe"] == 3  # kept in the index, set on every shard as it loads
    rng = np.random.default_rng(0)
    recalls = []
    for _ in range(10):
        q = head.vectors[rng.choice(len(head.vocab), 2, replace=False)].sum(0).numpy()
        want = {h.image_id for h in search_all(exact, head, vector=q, k=20)}
        got = {h.image_id for h in search_all(approx, head, vector=q, k=20)}
        recalls.append(len(want & got) / 20)
    assert np.mean(recalls) > 0.5, recalls


# --- incremental ---------------------------------------------------------------------------------

def _split_features(world, out: Path, first: int) -> tuple[Path, Path]:
    """The corpus's features as two shard files: rows [0, first) now, the rest "this week"."""
    table = pq.read_table(world["features"])
    d = out / "feats"
    d.mkdir()
    pq.write_table(table.slice(0, first), d / "part-a-00000.parquet")
    later = out / "later.parquet"
    pq.write_table(table.slice(first), later)
    return d, later


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("shard-*/*"))}


@pytest.mark.integration
def test_append_adds_shards_leaves_old_files_identical_and_equals_a_fresh_build(world, tmp_path):
    head = load_image_tagger(world["lr"])
    feats, later = _split_features(world, tmp_path, 400)
    out = tmp_path / "idx"
    _build(world, "lr", out, "--shards", "2", features=str(feats))
    before = _hashes(out)
    assert open_index(str(out)).images == 400
    (feats / "part-b-00000.parquet").write_bytes(later.read_bytes())  # featurize's resume adds a shard file
    _build(world, "lr", out, "--shards", "1", "--append", features=str(feats))
    info = open_index(str(out))
    assert info.version == 2 and info.shards == ("shard-00000", "shard-00001", "shard-00002") and info.images == IMAGES
    after = _hashes(out)
    assert {k: after[k] for k in before} == before  # existing shards untouched, byte for byte
    fresh = open_index(_build(world, "lr", tmp_path / "fresh", "--shards", "3", features=str(feats)))
    for cols in ([0], [1, 2], [0, 3, 4]):
        assert _key(search_all(info, head, columns=cols, k=30)) == _key(search_all(fresh, head, columns=cols, k=30))
    # appending again adds nothing and keeps the version
    _build(world, "lr", out, "--append", features=str(feats))
    assert open_index(str(out)).version == 2 and _hashes(out) == after


@pytest.mark.integration
def test_delete_hides_then_compact_removes(world, tmp_path, capsys):
    head = load_image_tagger(world["lr"])
    out = tmp_path / "idx"
    _build(world, "lr", out, "--shards", "2")
    info = open_index(str(out))
    top = search_all(info, head, columns=[0], k=10)
    gone = [top[0].image_id, top[3].image_id]
    files = _hashes(out)
    victims = tmp_path / "ids.txt"
    victims.write_text("\n".join([*gone, "no-such-image"]) + "\n")
    assert _index("--out", str(out), "--delete", str(victims)) == 0
    assert "2 image(s) tombstoned (1 not in the index" in capsys.readouterr().out
    info = open_index(str(out))
    assert info.version == 2 and info.tombstones() == set(gone) and _hashes(out) == files
    hidden = search_all(info, head, columns=[0], k=8)
    assert [h.image_id for h in hidden] == [h.image_id for h in top if h.image_id not in gone][:8]
    assert not {h.image_id for h in search_all(info, head, similar=top[1].image_id, k=50)} & set(gone)
    shutil.copytree(out, tmp_path / "before")
    assert _index("--out", str(out), "--compact") == 0
    info = open_index(str(out))
    assert info.version == 3 and info.tombstones() == set() and info.images == IMAGES - 2
    held = {s for s in ("shard-00000", "shard-00001")
            if set(gone) & set(pq.read_table(out.parent / "before" / s / "images.parquet").column("image_id").to_pylist())}
    assert held and all(not (out / s).exists() for s in held)  # the shards holding them were rewritten…
    untouched = {"shard-00000", "shard-00001"} - held
    assert untouched <= set(info.shards)  # …the others kept, byte for byte
    assert {k: v for k, v in _hashes(out).items() if k.split("/")[0] in untouched} == \
        {k: v for k, v in files.items() if k.split("/")[0] in untouched}
    assert not set(gone) & set(info.image_ids().to_pylist())
    assert _key(search_all(info, head, columns=[0], k=8)) == _key(hidden)


def _corrupt_second_row_group(path: Path) -> bytes:
    """Overwrites the middle of the file's second row group's column data (the footer stays
    readable, so the driver plans the build; the worker reading those rows fails)."""
    good = path.read_bytes()
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(1)
    start = col.data_page_offset
    bad = bytearray(good)
    bad[start : start + 64] = b"\xff" * 64
    path.write_bytes(bytes(bad))
    return good


def _free_cpus_settled(until: float | None = None, deadline_s: float = 30.0) -> float:
    """The cluster's free CPUs once they are at least `until` (or, without one, stop changing
    between two reads 0.5 s apart), or what they are at the deadline."""
    import time

    import ray

    end = time.monotonic() + deadline_s
    last = None
    while True:
        now = float(ray.available_resources().get("CPU", 0.0))
        if (now >= until if until is not None else now == last) or time.monotonic() > end:
            return now
        last = now
        time.sleep(0.5)


@pytest.mark.integration
def test_a_build_failing_midway_keeps_the_old_version_and_a_rerun_completes(world, tmp_path, capsys):
    head = load_image_tagger(world["lr"])
    out = tmp_path / "idx"
    _build(world, "lr", out, "--shards", "2")
    committed = (out / "index.json").read_bytes()
    feats = tmp_path / "feats"
    feats.mkdir()
    table = pq.read_table(world["features"])
    target = feats / "part-x-00000.parquet"
    pq.write_table(table, target, row_group_size=IMAGES // 2)
    good = _corrupt_second_row_group(target)
    capsys.readouterr()
    free = _free_cpus_settled()
    assert _index("--model", world["lr"], "--features", str(feats), "--manifest", world["dated"], "--out", str(out),
                  "--shards", "2") != 0
    # The failed pool's builders let go of their CPUs now (resources.released), not at Python's next
    # cycle collection: a re-run in this process beside a busy cluster would otherwise wait for them.
    assert _free_cpus_settled(until=free) >= free
    assert (out / "index.json").read_bytes() == committed  # still version 1, its shards intact
    info = open_index(str(out))
    assert info.version == 1 and search_all(info, head, columns=[1], k=3)
    target.write_bytes(good)
    _build(world, "lr", out, "--shards", "2", features=str(feats))
    info = open_index(str(out))
    assert info.version == 2 and len(info.shards) == 2 and info.images == IMAGES
    assert sorted(p.name for p in out.glob("shard-*")) == list(info.shards)  # no orphans, no duplicates


@pytest.mark.integration
def test_index_on_s3_equals_the_local_one(world, tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    head = load_image_tagger(world["embed"])
    local = open_index(_build(world, "embed", tmp_path / "local", "--shards", "2"))
    uri = f"s3://{bucket}/index"
    assert _index("--model", world["embed"], "--features", world["features"], "--manifest", world["dated"], "--out", uri,
                  "--shards", "2", "--endpoint-url", endpoint) == 0
    remote = open_index(uri, endpoint)
    assert remote.shards == local.shards and remote.version == 1
    q = head.vectors[:2].sum(0).numpy()
    assert _key(search_all(remote, head, vector=q, k=10, endpoint_url=endpoint)) == _key(search_all(local, head, vector=q, k=10))
    assert cli.main(["index", "--out", uri, "--delete", _truth_rows(world)[0][0], "--endpoint-url", endpoint]) == 0
    assert open_index(uri, endpoint).version == 2


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_bad_input_is_refused_naming_it(world, tmp_path, capsys):
    base = ["--features", world["features"], "--manifest", world["dated"], "--out", str(tmp_path / "x")]

    def err(*argv: str) -> str:
        capsys.readouterr()
        assert _index(*argv) == 2
        return capsys.readouterr().err

    assert "--shards must be ≥ 1, got 0" in err("--model", world["lr"], *base, "--shards", "0")
    assert "unknown column 'camera'" in err("--model", world["lr"], *base, "--columns", "user_id,camera")
    assert "column 'tags' is a list<string>" in err("--model", world["lr"], *base, "--columns", "tags")
    assert "--factory 'IVFxx,PQ': not a faiss index_factory string" in err("--model", world["embed"], *base,
                                                                             "--factory", "IVFxx,PQ")
    out = _build(world, "lr", tmp_path / "ok")
    other = _linear_model(world, tmp_path / "other", seed=9)
    assert "built with another model" in err("--model", other, "--features", world["features"], "--manifest",
                                             world["dated"], "--out", out, "--append")
    assert "built with another model" in err("--model", world["embed"], "--features", world["features"], "--out", out,
                                             "--append")
    capsys.readouterr()
    assert cli.main(["search", "--model", other, "--index", out, "--q", "x"]) == 2
    assert "built with another model" in capsys.readouterr().err
    tag = load_image_tagger(world["lr"]).vocab.tags[0]
    assert cli.main(["search", "--model", world["lr"], "--index", out, "--q", tag, "--where", "camera=x"]) == 2
    assert "the index keeps no column 'camera' (kept: user_id, date_taken)" in capsys.readouterr().err
    assert cli.main(["search", "--model", world["lr"], "--index", out, "--q", tag, "--min-score", "1.5"]) == 2
    assert "min_score must be in (0, 1]" in capsys.readouterr().err
    assert "no index to take deletes" in err("--out", str(tmp_path / "none"), "--delete", "a,b")
