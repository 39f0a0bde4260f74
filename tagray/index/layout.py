"""The linear heads' shard layout, exact for the AND-product ranking (seed 001 §5.3).

A query of tags t₁…t_m ranks images by Π_j P(z_{t_j}=1|x) — the sum of log P(z=1|x) rows.
Each shard keeps log P(z=1|x) of its n images tag-major, (T, n) float16, clipped to [-60, 0]:
a query reads m contiguous rows of its shard, 2 bytes per image per tag. The ranking is exact
with respect to the stored values: every shard sums the same float16 rows in the same order
in float32, so an image's score is one number whichever shard holds it, and merging the
shards' top-n by (-score, global row) equals the unsharded ranking (tests/test_index_shards.py).

A Searcher may also hold `coarse_codes` (uint8 ⌊|log P|·32⌋, one byte per image and tag, not
stored): they only bound which images can reach a query's top n (`_scan_codes`), so the ranking
stays the float16 one.

The alternative measured here, int8 log-probabilities (a per-tag affine code over the row's
range, 1 byte per image per tag), is not exact: `quantisation_loss` measures what it loses
(recall@k and rank agreement against float16) and benchmarks/index_build.py reports it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

LOG_P_MIN = -60.0  # log P(z=1|x) is clipped here (P < 1e-26 ranks as 1e-26)
LAYOUT = "log_p_float16_tag_major"


def to_layout(log_true: np.ndarray) -> np.ndarray:
    """(B, T) log P(z=1|x) of a batch → its (T, B) float16 columns of the shard."""
    return np.ascontiguousarray(np.asarray(log_true, np.float32).clip(LOG_P_MIN, 0).T.astype(np.float16))


def and_scores(log_p: np.ndarray, columns: list[int]) -> np.ndarray:
    """Σ_j log P(z_{t_j}=1|x) for every image of a (T, n) layout: float32, summed in query order."""
    total = log_p[columns[0]].astype(np.float32)
    for c in columns[1:]:
        total += log_p[c]
    return total


def top_rows(total: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest values of `total` (−inf excluded), by value descending and
    index ascending among equal values — an exact, deterministic top-n (ties at the cut are
    broken by the lower index, i.e. the lower global row within a shard).

    Above SAMPLED_ABOVE values it first keeps the candidates ≥ t, where t is the n-th largest of
    a sample (`_sampled`: ~1/SAMPLE_STRIDE of the values). A sample's n-th largest is at most the whole
    array's, so every one of the top n (and every tie at the cut) is a candidate: the answer is
    the same, from one comparison pass and a partition of ~n·SAMPLE_STRIDE candidates instead of
    a partition of all the values (BENCHMARKS, *Search over HTTP, sharded*)."""
    size = len(total)
    if n <= 0 or size == 0:
        return np.zeros(0, np.int64)
    if size > SAMPLED_ABOVE and n * SAMPLE_STRIDE * 4 <= size and len(sample := _sampled(total)) >= n:
        t = np.partition(sample, len(sample) - n)[len(sample) - n]
        if np.isfinite(t):
            cand = np.flatnonzero(total >= t)  # NaN and −inf fall out: t is finite
            return cand[_exact_top(total[cand], n)]
    return _exact_top(total, n)


SAMPLED_ABOVE = 1 << 16  # arrays longer than this take top_rows' sampled threshold first
SAMPLE_STRIDE = 64  # the samples hold one block of SAMPLE_BLOCK images in every SAMPLE_STRIDE blocks
SAMPLE_BLOCK = 1024  # contiguous, so that a sample reads whole cache lines (a stride of 64 read one value per line)


def _sampled(row: np.ndarray) -> np.ndarray:
    """A subset of a 1-D array's values: blocks 0, S, 2S, … of SAMPLE_BLOCK values (S =
    SAMPLE_STRIDE), ~1/S of them. Any subset's n-th largest is at most the whole array's, so
    this is a valid bound whatever the order of the images; spread over the array so that it
    is a tight one when the order is not random."""
    blocks = len(row) // SAMPLE_BLOCK
    return row[: blocks * SAMPLE_BLOCK].reshape(blocks, SAMPLE_BLOCK)[::SAMPLE_STRIDE].ravel()
CANDIDATES_AT_MOST = 64  # _candidates gathers only when the sample says ≤ 1/64 of the images pass; else _scan


def _exact_top(total: np.ndarray, n: int) -> np.ndarray:
    """top_rows by one partition of all the values (−inf excluded)."""
    finite = np.isfinite(total)
    avail = int(finite.sum()) if not finite.all() else len(total)
    n = min(n, avail)
    if n <= 0:
        return np.zeros(0, np.int64)
    if n < len(total):
        kth = np.partition(total, len(total) - n)[len(total) - n]  # the n-th largest value
        above = np.flatnonzero(total > kth)
        at = np.flatnonzero(total == kth)[: n - len(above)]
        cand = np.concatenate([above, at])
    else:
        cand = np.flatnonzero(finite)
    order = np.lexsort((cand, -total[cand].astype(np.float64)))
    return cand[order]


def top_and(log_p: np.ndarray, columns: list[int], n: int, mask: np.ndarray | None = None, threads: int = 1,
            codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, Σ_j log P of those rows): the exact top n of `and_scores(log_p, columns)` among the
    rows `mask` keeps (None: all), in `top_rows`' order, with the same float32 sums.

    Every log P is ≤ 0, so an image whose sum reaches t has every one of its m values ≥ t. With t
    the n-th largest sum of a sample of the images (blocks spread over the shard; at most the n-th
    largest of all of them: `_sampled_bound`), only images whose sum can reach t are summed exactly
    and ranked; the others cannot be in the top n, so the answer equals summing every image
    (tests/test_index_shards.py). Those images are found either tag by tag (`_candidates`: each value ≥ t,
    by comparing float16 bit patterns as integers — one integer pass when a tag is selective), or,
    when no tag is (common tags, narrow ranges), by a bound on every image's sum, split over
    `threads`: from the shard's `coarse_codes` when given (`_scan_codes`: one byte per image and
    tag, integer adds), else from the float16 patterns shifted into float32 magnitudes (`_scan`:
    two integer and float passes per tag instead of numpy's float16 cast) (BENCHMARKS, *Search
    over HTTP, sharded*)."""
    size = log_p.shape[1] if log_p.ndim == 2 else 0
    if (log_p.dtype == np.float16 and size > SAMPLED_ABOVE and n * SAMPLE_STRIDE * 4 <= size
            and (t := _sampled_bound(log_p, columns, n, mask)) is not None):
        found = _candidates(log_p, columns, t, mask)
        if found is None and codes is not None and len(columns) <= CODES_SUMMED_AT_MOST:
            found = _scan_codes(codes, columns, t, mask, threads)
        elif found is None:
            found = _scan(log_p, columns, t, mask, threads)
        total = _sum_rows(log_p, columns, found)
        local = _exact_top(total, n)
        return found[local], total[local]
    total = and_scores(log_p, columns)
    if mask is not None:
        total[~mask] = -np.inf
    rows = top_rows(total, n)
    return rows, total[rows]


def _sum_rows(log_p: np.ndarray, columns: list[int], rows: np.ndarray | slice) -> np.ndarray:
    """and_scores of `rows` (indices or a slice) only: the same float32 sums, in query order."""
    total = log_p[columns[0], rows].astype(np.float32)
    for c in columns[1:]:
        total += log_p[c, rows]
    return total


def _sampled_bound(log_p: np.ndarray, columns: list[int], n: int, mask: np.ndarray | None) -> float | None:
    """The n-th largest sum of a sample of the images (`_sampled`; masked ones out): every image of the
    top n sums to at least this. None when it is no usable bound (fewer than n sampled, or 0)."""
    sample = _sampled(log_p[columns[0]]).astype(np.float32)
    for c in columns[1:]:
        sample += _sampled(log_p[c])
    if mask is not None:
        sample[~_sampled(mask)] = -np.inf
    if len(sample) < n:
        return None
    t = float(np.partition(sample, len(sample) - n)[len(sample) - n])
    return t if np.isfinite(t) and t < 0 else None


def _candidates(log_p: np.ndarray, columns: list[int], t: float, mask: np.ndarray | None) -> np.ndarray | None:
    """The rows (ascending) whose every value in `columns` is ≥ t; None when the tags are not
    selective enough (the sample keeps more than 1/CANDIDATES_AT_MOST of the images: `_scan`
    is then faster than gathering them)."""
    t16 = np.float16(t)
    if float(t16) > t:  # round down, so that every value ≥ t is ≥ t16
        t16 = np.nextafter(t16, np.float16(-np.inf))
    bound = t16.view(np.uint16)  # negative float16: value ≥ t16 ⇔ pattern ≤ bound (and 0, +0 ≤ bound too)
    bits = log_p.view(np.uint16)
    passes = {c: _sampled(bits[c]) <= bound for c in dict.fromkeys(columns)}
    order = sorted(passes, key=lambda c: int(np.count_nonzero(passes[c])))  # the most selective tag first
    kept = np.logical_and.reduce([passes[c] for c in order])
    if np.count_nonzero(kept) * CANDIDATES_AT_MOST > len(kept):
        return None
    rows = np.flatnonzero(bits[order[0]] <= bound)
    for c in order[1:]:
        rows = rows[bits[c, rows] <= bound]
    if mask is not None:
        rows = rows[mask[rows]]
    return rows


SCAN_CHUNK = 1 << 18  # images per pass of _scan: its two work arrays (1 MiB each) stay in cache
PART_ROWS_AT_LEAST = 1 << 21  # a scan is split over threads only in parts of ≥ 2M images
_MAGNITUDE = 2.0**-80  # a float16 pattern of x ≤ 0, shifted left 13, is the float32 |x|·2⁻⁸⁰


def _scan(log_p: np.ndarray, columns: list[int], t: float, mask: np.ndarray | None, threads: int = 1) -> np.ndarray:
    """The rows (ascending) whose sum over `columns` can reach t (a superset of those that do),
    chunk by chunk without numpy's float16 → float32 cast; `threads` > 1 scans that many
    contiguous parts at once (numpy releases the GIL in these loops).

    For x ≤ 0 stored as float16 with bits h, the float32 with bits h << 13 is exactly |x|·2⁻⁸⁰
    (the sign bit lands on the exponent's bit 5: exponent e + 32 = (e − 15) + 127 − 80), and a
    power-of-two scale leaves float32 rounding unchanged, so Σ_j of those equals −and_scores·2⁻⁸⁰
    for normal values. Subnormals and −0 come out larger by at most 2⁻¹⁵ in |x| each: the bound
    adds m·2⁻¹⁴ (m = len(columns)) and a relative m·2⁻²⁰ for rounding, so no image with a sum ≥ t
    is left out; the caller sums the candidates exactly."""
    bits = log_p.view(np.uint16)
    size, m = bits.shape[1], len(columns)
    limit = np.float32((-t * (1 + m * 2.0**-20) + m * 2.0**-14) * _MAGNITUDE)
    limit = np.nextafter(limit, np.float32(np.inf))

    def summer(chunk: int):
        word, acc = np.empty(chunk, np.uint32), np.empty(chunk, np.float32)

        def sums(start: int, stop: int) -> np.ndarray:
            w, a = word[: stop - start], acc[: stop - start]
            for j, c in enumerate(columns):
                np.left_shift(bits[c, start:stop], 13, out=w, dtype=np.uint32, casting="unsafe")
                if j:
                    a += w.view(np.float32)
                else:
                    np.copyto(a, w.view(np.float32))
            return a
        return sums

    return _rows_within(size, limit, mask, threads, summer)


def _rows_within(size: int, limit, mask: np.ndarray | None, threads: int, summer) -> np.ndarray:
    """The rows (ascending) of [0, size) whose per-image bound is ≤ `limit` and that `mask` keeps,
    chunk by chunk of SCAN_CHUNK images: `summer(chunk)` gives each part its own work arrays and
    returns `sums(start, stop)`, the bound of images start…stop−1 (`_scan`, `_scan_codes`)."""
    chunk = min(SCAN_CHUNK, size)

    def part(lo: int, hi: int) -> list[np.ndarray]:
        sums, found = summer(chunk), []
        for start in range(lo, hi, chunk):
            stop = min(hi, start + chunk)
            local = np.flatnonzero(sums(start, stop) <= limit)
            if mask is not None:
                local = local[mask[start + local]]
            found.append(local + start)
        return found

    return _in_parts(size, chunk, threads, part)


def _in_parts(size: int, chunk: int, threads: int, part) -> np.ndarray:
    """`part(lo, hi)` (a list of ascending row arrays) over [0, size) split into `threads` contiguous
    parts on whole chunks, run at once, each of at least PART_ROWS_AT_LEAST rows (below that the
    hand-off to the pool costs more than the part: BENCHMARKS); their rows concatenated, ascending."""
    chunks = -(-size // chunk)
    parts = min(max(1, threads), chunks, max(1, size // PART_ROWS_AT_LEAST))
    edges = [size * i // parts // chunk * chunk for i in range(parts)] + [size]
    if parts == 1:
        found = part(0, size)
    else:
        found = [f for got in _pool(parts).map(part, edges[:-1], edges[1:]) for f in got]
    return np.concatenate(found) if found else np.zeros(0, np.int64)


# --- coarse codes: one byte per image and tag, a lower bound on |log P| ---------------------------

CODE_STEPS = 32  # coarse codes count |log P| in steps of 1/32 nat …
CODE_MAX = 255  # … up to 255/32 ≈ 8 nats (P ≈ 3.4e-4); larger magnitudes all code 255
CODES_SUMMED_AT_MOST = 257  # query tags _scan_codes sums in uint16 (257 × 255 ≤ 65535); more: _scan


def _code_table() -> np.ndarray:
    """The code of every float16 bit pattern: min(255, ⌊−x·32⌋) for x ≤ 0 (exact: x·32 is exact in
    float64), 0 for +0, positive values and NaN (no bound: such an image is always a candidate)."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(invalid="ignore"):
        code = np.floor(np.where(x < 0, -x, 0.0) * CODE_STEPS)
    return np.where(np.isnan(code), 0, np.minimum(code, CODE_MAX)).astype(np.uint8)


def coarse_codes(log_p: np.ndarray) -> np.ndarray:
    """(T, n) uint8 codes of a (T, n) float16 layout: ⌊|x|·32⌋ capped at 255, so code/32 ≤ |x| for
    every value — the bound `_scan_codes` sums. One byte per image and tag more in RAM (a Searcher
    computes them when it loads a shard: ServeConfig.scan_codes), read a tag row at a time."""
    table = _code_table()
    out = np.empty(log_p.shape, np.uint8)
    bits = log_p.view(np.uint16)
    for c in range(bits.shape[0]):
        np.take(table, bits[c], out=out[c])
    return out


def _scan_codes(codes: np.ndarray, columns: list[int], t: float, mask: np.ndarray | None, threads: int = 1
                ) -> np.ndarray:
    """`_scan` from the coarse codes: the rows (ascending) whose Σ_j code_j can come from a sum ≥ t.

    An image summing S ≥ t in float32 (m − 1 roundings, each within 2⁻²⁴ relative of nonpositive
    partial sums) has an exact sum R with |R| ≤ |t|·(1 + m·2⁻²³), and Σ code_j ≤ 32·Σ|x_j| = 32·|R|;
    Σ code_j is an integer, so keeping the images with Σ code_j ≤ ⌊32·|t|·(1 + m·2⁻²⁰)⌋ leaves
    none of them out. One byte read per image and tag and uint16 adds (about 2× `_scan` at 10M;
    BENCHMARKS); the caller sums the candidates exactly."""
    m = len(columns)
    limit = min(int(np.floor(-t * CODE_STEPS * (1 + m * 2.0**-20))), 0xFFFF)  # ≥ 255·m: every image passes

    def summer(chunk: int):
        acc = np.empty(chunk, np.uint16)

        def sums(start: int, stop: int) -> np.ndarray:
            a = acc[: stop - start]
            if m == 1:
                np.copyto(a, codes[columns[0], start:stop])
            else:
                np.add(codes[columns[0], start:stop], codes[columns[1], start:stop], out=a, dtype=np.uint16)
            for c in columns[2:]:
                np.add(a, codes[c, start:stop], out=a, dtype=np.uint16)
            return a
        return sums

    return _rows_within(codes.shape[1], limit, mask, threads, summer)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count, kept for the process (a Searcher scans with the same count)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="tagray-scan")
    return _POOLS[threads]


# --- the measured alternative: int8 codes --------------------------------------------------------

def quantise_int8(log_p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tag row an affine int8 code over [row min, 0]: (codes (T, n) int8, scale (T,), offset (T,))."""
    lp = log_p.astype(np.float32)
    lo = lp.min(axis=1)
    scale = np.where(lo < 0, -lo / 255.0, 1.0).astype(np.float32)
    codes = np.round((lp - lo[:, None]) / scale[:, None]) - 128
    return codes.clip(-128, 127).astype(np.int8), scale, lo


def dequantise_int8(codes: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return ((codes.astype(np.float32) + 128) * scale[:, None] + lo[:, None]).astype(np.float32)


def quantisation_loss(log_p: np.ndarray, queries: list[list[int]], k: int = 20) -> dict:
    """What int8 codes lose against the float16 layout on `queries`: mean recall@k of the exact
    top-k, the share of queries whose top-k is the same list in the same order, and bytes/image/tag."""
    codes, scale, lo = quantise_int8(log_p)
    approx = dequantise_int8(codes, scale, lo)
    recall, same = [], []
    for cols in queries:
        exact = top_rows(and_scores(log_p, cols), k)
        total = approx[cols[0]].copy()
        for c in cols[1:]:
            total += approx[c]
        got = top_rows(total, k)
        recall.append(len(set(exact.tolist()) & set(got.tolist())) / max(1, len(exact)))
        same.append(bool(np.array_equal(exact, got)))
    return {"k": k, "queries": len(queries), "recall_at_k": float(np.mean(recall)),
            "same_top_k_order": float(np.mean(same)), "bytes_per_image_tag": {"float16": 2, "int8": 1}}
