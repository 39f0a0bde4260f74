"""Tag-pair similarity ξ of seed 002 (eq. 3–5), precomputed once per vocabulary:

    dist_ctx(t_i, t_j) = (max(log f_i, log f_j) − log f_ij) / (log N − min(log f_i, log f_j))   (eq. 3)
    dist(t_i, t_j)     = dist_ctx + α · dist_KB                                                  (eq. 4)
    ξ_ij               = exp(−dist² / σ)                                                         (eq. 5)

f are image counts on the training set (normalised Google distance with images for pages);
a pair that never co-occurs has dist_ctx = ∞ and ξ = 0. dist_KB = 1 − Lin similarity of the
tags' first noun senses in WordNet, 2·IC(lcs) / (IC(s_i) + IC(s_j)), with information content
counted from the training tags (Resnik: every sense of a tag and all its hypernyms get the
tag's image count; +1 smoothing, nltk's convention; IC relative to the root's count); 1 for a tag with no noun sense.
σ is the median of the finite off-diagonal dist² (the paper: "the medium value").
"""

from __future__ import annotations

import numpy as np


def google_distance(counts: np.ndarray, cooccur: np.ndarray, n: int) -> np.ndarray:
    """(C, C) eq. 3 from per-tag counts f_i, co-occurrence counts f_ij and N images; 0 on the diagonal."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_f = np.log(np.maximum(counts, 1).astype(np.float64))
        log_fij = np.where(cooccur > 0, np.log(np.maximum(cooccur, 1)), -np.inf)
        num = np.maximum(log_f[:, None], log_f[None, :]) - log_fij
        den = np.log(n) - np.minimum(log_f[:, None], log_f[None, :])
        d = np.where(den > 0, num / np.maximum(den, 1e-12), np.inf)
    np.fill_diagonal(d, 0.0)
    return d


def _closure(synset) -> set:
    return {synset, *synset.closure(lambda s: s.hypernyms() + s.instance_hypernyms())}


def information_content(tags: list[str], counts: np.ndarray, smoothing: float = 1.0) -> tuple[dict, dict]:
    """(first noun synset of each tag (None if none), nltk-format IC table {"n": {offset: freq, 0: total}})
    counted from the tags' image counts, as nltk's `WordNetCorpusReader.ic` would from a corpus
    that contains each tag `count` times (only the synsets that the tags reach are kept)."""
    from tagray.data.wordnet import wordnet

    wn = wordnet()
    first, freq = {}, {}
    for tag, count in zip(tags, counts, strict=True):
        senses = wn.synsets(tag.replace(" ", "_"), pos="n")
        first[tag] = senses[0] if senses else None
        for sense in senses:
            for s in _closure(sense):
                freq[s.offset()] = freq.get(s.offset(), smoothing) + float(count)
    # The root's count as the total, so that IC ≥ 0 (nltk uses the corpus size, which is below the
    # root's count when words have several senses, and Lin similarities can then leave [0, 1]).
    return first, {"n": {**freq, 0: max(freq.values(), default=1.0)}}


def wordnet_distance(tags: list[str], counts: np.ndarray) -> np.ndarray:
    """(C, C) dist_KB = 1 − Lin similarity (the lcs found for all pairs at once: every common
    hypernym paints its IC onto the pairs below it, in increasing IC order)."""
    first, ic = information_content(tags, counts)
    table = ic["n"]

    def ic_of(s) -> float:
        return float(-np.log(table.get(s.offset(), 1.0) / table[0]))

    c = len(tags)
    below: dict = {}
    own = np.zeros(c)
    for i, tag in enumerate(tags):
        s = first[tag]
        if s is None:
            continue
        own[i] = ic_of(s)
        for a in _closure(s):
            below.setdefault(a, []).append(i)
    lcs = np.zeros((c, c))
    for a, rows in sorted(below.items(), key=lambda item: ic_of(item[0])):
        r = np.asarray(rows)
        lcs[np.ix_(r, r)] = ic_of(a)
    has = np.array([first[t] is not None for t in tags])
    denom = own[:, None] + own[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        lin = np.where(denom > 0, 2 * lcs / denom, 0.0)
    lin = np.where(has[:, None] & has[None, :], np.clip(lin, 0.0, 1.0), 0.0)
    dist = 1.0 - lin
    np.fill_diagonal(dist, 0.0)
    return dist


def tag_similarity(ctx: np.ndarray, kb: np.ndarray, alpha: float) -> np.ndarray:
    """ξ (eq. 4–5) from dist_ctx and dist_KB; symmetric, 1 on the diagonal, 0 for pairs at ∞."""
    d2 = (ctx + alpha * kb) ** 2
    off = ~np.eye(len(d2), dtype=bool) & np.isfinite(d2)
    sigma = float(np.median(d2[off])) if off.any() else 1.0
    xi = np.exp(-d2 / max(sigma, 1e-12))
    return np.where(np.isfinite(d2), xi, 0.0)


def cooccurrence(tag_ids: np.ndarray, tags: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts (C,), co-occurrence (C, C)) of padded tag-id rows (−1 = none)."""
    import scipy.sparse as sp

    rows, cols = np.nonzero(tag_ids >= 0)
    a = sp.csr_matrix((np.ones(len(rows), np.float64), (rows, tag_ids[rows, cols])), shape=(len(tag_ids), tags))
    a.sum_duplicates()
    a.data[:] = 1.0
    co = (a.T @ a).toarray()
    return np.diagonal(co).copy(), co
