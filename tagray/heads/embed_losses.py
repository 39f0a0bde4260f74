"""Losses of the word-embedding head (seed 004 §2, SPEC §3.2), written to be minimised.

Shapes: f (B, d) image embeddings h(x); vp (B, P, d) sampled positive word vectors;
vn (B, N, d) sampled negative word vectors; scores (B, V) = f·vᵀ over the whole vocabulary.
Every loss is a sum over an image's terms, averaged over the images of the batch.
Log-sigmoids (`F.logsigmoid`, `softplus`) keep them finite for any score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tagray.heads.targets import multi_hot


def sampled_xent(f: torch.Tensor, vp: torch.Tensor, vn: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """Eq. 1, negated (with SPEC §3.2's sums of logs):

        −Σ_p log σ(f·v_p) − Σ_n log σ(−f·v_n) − α (Σ_{p≠p'} σ(v_p·v_p') + Σ_{p,n} σ(−v_p·v_n))

    The co-occurrence sum runs over ordered pairs of distinct sample positions p ≠ p': the
    p = p' terms σ(‖v_p‖²) only reward longer vectors and say nothing about co-occurrence."""
    sp = torch.einsum("bd,bpd->bp", f, vp)
    sn = torch.einsum("bd,bnd->bn", f, vn)
    fit = -F.logsigmoid(sp).sum(1) - F.logsigmoid(-sn).sum(1)
    if alpha == 0:
        return fit.mean()
    pp = torch.sigmoid(torch.einsum("bpd,bqd->bpq", vp, vp))
    off_diagonal = pp.sum((1, 2)) - pp.diagonal(dim1=1, dim2=2).sum(1)
    pn = torch.sigmoid(-torch.einsum("bpd,bnd->bpn", vp, vn)).sum((1, 2))
    return (fit - alpha * (off_diagonal + pn)).mean()


def full_xent(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Unsampled cross-entropy over every word: −Σ_t [y_t log σ(s_t) + (1−y_t) log σ(−s_t)],
    y the multi-hot of `positives` ((B, W) word ids padded with −1)."""
    y = multi_hot(positives, scores.shape[1], scores.dtype)
    return F.binary_cross_entropy_with_logits(scores, y, reduction="none").sum(1).mean()


def fast0tag(f: torch.Tensor, vp: torch.Tensor, vn: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. 5 (Fast0Tag's RankNet loss), negated, over sampled pairs:
    −β Σ_p Σ_n log σ(f·(v_p − v_n)). Cost O(P·N) per image."""
    sp = torch.einsum("bd,bpd->bp", f, vp)
    sn = torch.einsum("bd,bnd->bn", f, vn)
    return -(beta * F.logsigmoid(sp[:, :, None] - sn[:, None, :])).sum((1, 2)).mean()


def fast0tag_full(scores: torch.Tensor, positives: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. 5 over every (tag, non-tag) pair of each image — the unsampled Fast0Tag:
    β Σ_{p ∈ tags} Σ_{n ∉ tags} softplus(s_n − s_p). Memory B·W·V."""
    valid = positives >= 0
    s_p = scores.gather(1, positives.clamp(min=0))  # (B, W)
    negative = 1.0 - multi_hot(positives, scores.shape[1], scores.dtype)  # (B, V)
    pair = F.softplus(scores[:, None, :] - s_p[:, :, None])  # (B, W, V)
    return (beta * pair * negative[:, None, :] * valid[:, :, None]).sum((1, 2)).mean()
