"""Out-of-vocabulary snapping (seed 004 §2.1, eq. 3–4).

Training moves the vectors of words seen in image tags (V_I) and leaves the others (V_D)
where the pretrained file put them, so dot products between the two sets lose meaning.
Snapping moves only V_D so that their sigmoid correlations to every word match the
initial ones:

    C⁽ⁱ⁾_{d,m} = σ(v⁽ⁱ⁾_d · v⁽ⁱ⁾_m)                                                (eq. 3)
    min over V_D of  −Σ_{d∈D, m∈∪} C⁽ⁱ⁾_{d,m} log σ(v_d·v_m) + (1−C⁽ⁱ⁾_{d,m}) log(1−σ(v_d·v_m))   (eq. 4)

i.e. a binary cross-entropy with soft targets. As the paper's footnote says, C⁽ⁱ⁾ is never
built: each step compares a batch of unseen words with a sample of anchor words, computing
the dot products of both the initial and the current vectors on the fly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def snap_oov(
    initial: torch.Tensor,
    trained: torch.Tensor,
    unseen: np.ndarray,
    steps: int = 300,
    lr: float = 0.05,
    anchors: int = 4096,
    seed: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Returns (vectors with the `unseen` rows snapped, info). Rows of seen words are
    returned unchanged. `initial`, `trained`: (V, d); `unseen`: (V,) bool."""
    unseen = np.asarray(unseen, dtype=bool)
    d_ids = np.nonzero(unseen)[0]
    out = trained.clone()
    if len(d_ids) == 0 or steps <= 0:
        return out, {"words": int(len(d_ids)), "steps": 0}
    vocab = len(trained)
    where_in_d = np.full(vocab, -1, dtype=np.int64)
    where_in_d[d_ids] = np.arange(len(d_ids))
    emb = nn.Embedding.from_pretrained(trained[d_ids].clone().float(), freeze=False, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    initial = initial.float()
    fixed = trained.float()

    def loss_of(d: np.ndarray, m: np.ndarray) -> torch.Tensor:
        vd = emb(torch.from_numpy(d))
        m_in_d = where_in_d[m]
        vm = fixed[torch.from_numpy(m)]
        moving = torch.from_numpy(m_in_d >= 0)
        if moving.any():
            vm = torch.where(moving[:, None], emb(torch.from_numpy(np.maximum(m_in_d, 0))), vm)
        target = torch.sigmoid(initial[torch.from_numpy(d_ids[d])] @ initial[torch.from_numpy(m)].T)
        return F.binary_cross_entropy_with_logits(vd @ vm.T, target)

    def sample() -> tuple[np.ndarray, np.ndarray]:
        d = np.arange(len(d_ids)) if len(d_ids) <= anchors else rng.choice(len(d_ids), anchors, replace=False)
        m = np.arange(vocab) if vocab <= anchors else rng.choice(vocab, anchors, replace=False)
        return d, m

    probe = sample()
    with torch.no_grad():
        before = float(loss_of(*probe))
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(*sample())
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_of(*probe))
        out[torch.from_numpy(d_ids)] = emb.weight.detach().to(out.dtype)
    return out, {"words": int(len(d_ids)), "steps": steps, "loss_before": before, "loss_after": after}
