"""Weakly-supervised annotation and tag refinement (seed 002, SPEC §3.3), plain PyTorch.

ϕ is an MLP over extracted features whose hidden layer is the "visual feature" v = ϕ(i) and
whose sigmoid outputs are the tag probabilities p (C tags). Training (Algorithm 2):

1. ϕ0: multi-label logistic loss on the user tags;
2. candidates Z_i: the M nearest training images to i in ϕ0's visual-feature space (faiss);
3. from ϕ0, batches built by Algorithm 1 (s/m groups: an image and the m−1 nearest of its
   candidates under the current ϕ), trained on L = L_vis + λ1 L_sem + λ2 L_err:

    L_vis = m / (s(m−1)) Σ_j Σ_e γ_{j,e} ‖p_j − p_{z_e}‖²,  γ = exp(−‖v_j − v_e‖² / σ)   (eq. 2)
    L_sem = (1/C²) Tr[Pᵀ (Q − ξ) P]  (P: s × C, taken as C × s columns per tag)         (eq. 7–8)
          = (1/(2C²)) Σ_i Σ_j ξ_ij ‖p'_i − p'_j‖²                                       (eq. 6 / 2)
    L_err = ‖G − P‖₁                                                                      (eq. 9)

σ of γ is the median of the batch's squared distances (the paper: "the medium value");
γ is a weight, not a path for gradients. ξ is precomputed (tagray/data/tag_similarity.py).
Refinement = p on the training images; annotation = p on new images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tagray.config import ConfigError

log = logging.getLogger(__name__)

TRAIN_LAYERS = ("visual", "all")


@dataclass(frozen=True)
class RefineConfig:
    head: str = "refine"
    hidden: int = 512  # the visual feature's size (paper: VGG-16's 4096-d fc layer)
    dropout: float = 0.0
    lambda1: float = 1.0  # λ1: weight of L_sem (grid-searched in the paper)
    lambda2: float = 0.01  # λ2: weight of L_err
    alpha: float = 1.0  # α: weight of the WordNet distance in the tag distance (eq. 4)
    batch_size: int = 64  # s (paper: 64)
    m: int = 8  # images per group: an image and its m−1 dynamic neighbours (paper: 8)
    max_rank: int = 512  # M: candidates per image from ϕ0's feature space (paper: 512)
    epochs: int = 30  # weakly-supervised epochs (paper: 30)
    lr: float = 1e-3  # SGD (paper: 1e-3, ÷10 every 10 epochs)
    lr_step_epochs: int = 10
    momentum: float = 0.9
    train_layers: str = "visual"  # what L_final trains: visual (ϕ0's classifier kept) | all (the paper)
    init_epochs: int = 10  # ϕ0: multi-label logistic epochs on the user tags (at least: see min_init_steps)
    min_init_steps: int = 800  # ϕ0: init_epochs = max(init_epochs, ⌈min_init_steps / steps per epoch⌉), at most max_init_epochs; at 3,000 images ϕ0's test mAP_L is 0.40 after 300 Adam steps, 0.728 after 800, 0.607 after 2,000 (it overfits the user tags; BENCHMARKS)
    max_init_epochs: int = 300  # the most ϕ0 epochs min_init_steps may ask for
    init_lr: float = 1e-3  # ϕ0: Adam
    init_batch_size: int = 256
    seed: int = 0
    checkpoint_every: int = 500  # Ray Train: steps between checkpoints (and every epoch)
    normalizer: str = "normalize.yaml"  # tag normaliser settings (path, or name in configs/)

    def __post_init__(self) -> None:
        if self.head != "refine":
            raise ConfigError(f"RefineConfig is the refine head, got head={self.head!r}")
        if not 2 <= self.m <= self.max_rank + 1:
            raise ConfigError(f"need 2 ≤ m ≤ max_rank + 1 (M), got m={self.m}, max_rank={self.max_rank}")
        if self.batch_size % self.m:
            raise ConfigError(f"batch_size s={self.batch_size} must be a multiple of m={self.m} (s/m groups)")
        if min(self.hidden, self.epochs, self.init_epochs, self.lr_step_epochs, self.init_batch_size) < 1:
            raise ConfigError("hidden, epochs, init_epochs, lr_step_epochs and init_batch_size must be ≥ 1")
        if self.train_layers not in TRAIN_LAYERS:
            raise ConfigError(f"train_layers must be one of {', '.join(TRAIN_LAYERS)}, got {self.train_layers!r}")
        # each check is written so that NaN fails it too (every comparison with NaN is false)
        if not (self.lambda1 >= 0 and self.lambda2 >= 0 and self.alpha >= 0 and self.lr > 0 and self.init_lr > 0):
            raise ConfigError(f"λ1, λ2, α must be ≥ 0 and learning rates > 0; got lambda1={self.lambda1}, "
                              f"lambda2={self.lambda2}, alpha={self.alpha}, lr={self.lr}, init_lr={self.init_lr}")
        if not (0 <= self.dropout < 1 and 0 <= self.momentum < 1):
            raise ConfigError(f"need 0 ≤ dropout < 1 and 0 ≤ momentum < 1, got {self.dropout}, {self.momentum}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be ≥ 1, got {self.checkpoint_every}")
        if self.min_init_steps < 0 or self.max_init_epochs < 1:
            raise ConfigError(f"need min_init_steps ≥ 0 and max_init_epochs ≥ 1, got {self.min_init_steps}, "
                              f"{self.max_init_epochs}")


class RefineNet(nn.Module):
    """ϕ: features (B, D) → visual feature v (B, hidden) → tag logits (B, C)."""

    def __init__(self, dim: int, tags: int, hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim, self.tags = dim, tags
        self.visual = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.out = nn.Linear(hidden, tags)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.visual(x))

    # The evaluation interface of the linear heads (tagray.eval.report.Tagger): P(y) and log P(z)
    # are the same sigmoid output here (no tagging-likelihood model).
    robust = False

    def probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(x)
        return torch.sigmoid(logits), nn.functional.logsigmoid(logits)


def visual_consistency(p: torch.Tensor, v: torch.Tensor, m: int) -> torch.Tensor:
    """L_vis (eq. 2) of a batch laid out as s/m groups of m rows, the group's image first."""
    s, c = p.shape
    groups = p.view(s // m, m, c)
    feats = v.detach().view(s // m, m, -1)
    d2 = (feats[:, 1:] - feats[:, :1]).pow(2).sum(-1)  # (s/m, m−1) ‖v_j − v_e‖²
    sigma = d2.median().clamp_min(1e-12)
    gamma = torch.exp(-d2 / sigma)
    diff = (groups[:, 1:] - groups[:, :1]).pow(2).sum(-1)  # ‖p_j − p_e‖²
    return m / (s * (m - 1)) * (gamma * diff).sum()


def tag_laplacian(xi: torch.Tensor) -> torch.Tensor:
    """Q − ξ with Q_ii = Σ_{j≠i} ξ_ij (eq. 7), the diagonal of ξ ignored."""
    off = xi - torch.diag(torch.diagonal(xi))
    return torch.diag(off.sum(1)) - off


def semantic_dependency(p: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
    """L_sem (eq. 8) = Tr[Pᵀ(Q − ξ)P] / C², with P's columns the tags' score vectors over the batch."""
    c = p.shape[1]
    return torch.einsum("bi,ij,bj->", p, laplacian, p) / c**2


def semantic_dependency_pairs(p: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """Eq. 6 written as the double sum (the reference for eq. 8: eq. 6 = 2 · eq. 8)."""
    c = p.shape[1]
    return sum(xi[i, j] * (p[:, i] - p[:, j]).pow(2).sum() for i in range(c) for j in range(c)) / c**2


def user_error(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """L_err (eq. 9) = ‖G − P‖₁ over the batch."""
    return (g - p).abs().sum()


@torch.no_grad()
def dynamic_batch(model: RefineNet, x_all: torch.Tensor, anchors: np.ndarray, candidates: np.ndarray, m: int) -> np.ndarray:
    """Algorithm 1: for each anchor image, forward its candidates Z_i through the current ϕ, keep the
    m−1 nearest to it in visual-feature space; returns the batch's rows, group by group, anchor first."""
    model.eval()
    cand = candidates[anchors]  # (G, M), −1 where an image has fewer candidates
    device = x_all.device
    valid = torch.from_numpy(cand >= 0).to(device)
    v_cand = model.features(x_all[torch.from_numpy(np.maximum(cand, 0).astype(np.int64)).to(device)])  # (G, M, h)
    v_anchor = model.features(x_all[torch.from_numpy(anchors.astype(np.int64)).to(device)])  # (G, h)
    d2 = (v_cand - v_anchor[:, None]).pow(2).sum(-1).masked_fill(~valid, math.inf)
    nearest = torch.topk(d2, m - 1, dim=1, largest=False).indices.cpu().numpy()
    chosen = np.take_along_axis(cand, nearest, axis=1)
    chosen = np.where(chosen >= 0, chosen, anchors[:, None])  # too few candidates: repeat the image
    model.train()
    return np.concatenate([anchors[:, None], chosen], axis=1).reshape(-1)


def visual_candidates(features: np.ndarray, max_rank: int) -> np.ndarray:
    """The M nearest images of every image by Euclidean distance (exact faiss), itself excluded: (N, M)."""
    import faiss

    v = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexFlatL2(v.shape[1])
    index.add(v)
    k = min(max_rank + 1, len(v))
    _, nn = index.search(v, k)
    out = np.full((len(v), max_rank), -1, dtype=np.int32)
    for i_row in range(0, len(v), 65_536):  # drop self wherever it landed among ties
        block = nn[i_row : i_row + 65_536]
        own = block == np.arange(i_row, i_row + len(block))[:, None]
        own[:, -1] |= ~own.any(1)  # self not found: drop the farthest instead
        kept = block[~own].reshape(len(block), k - 1)
        out[i_row : i_row + len(block), : k - 1] = kept
    return out


def init_step(model: RefineNet, forward: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, g: torch.Tensor) -> float:
    """ϕ0: one multi-label logistic step on the user tags."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.binary_cross_entropy_with_logits(forward(x), g, reduction="none").sum(1).mean()
    loss.backward()
    opt.step()
    return float(loss.detach())


def refine_step(model: RefineNet, forward: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, g: torch.Tensor,
                laplacian: torch.Tensor, cfg: RefineConfig, world: int = 1) -> dict[str, float]:
    """One SGD step on L_final of an Algorithm 1 batch; `forward` is the model or its DDP wrapper.

    With `world` workers each holds 1/world of the batch and DDP averages their gradients, so
    the terms that sum over the batch's images (L_sem, L_err) are scaled by `world` to keep the
    whole batch's sum (L_vis is already a mean over the groups): the step, and the losses
    reported, are then those of one process on the whole batch."""
    model.train()
    model.zero_grad(set_to_none=True)  # also the layers `opt` does not train
    v = model.features(x)
    p = torch.sigmoid(forward(x) if forward is not model else model.out(v))
    parts = {"l_vis": visual_consistency(p, v, cfg.m), "l_sem": world * semantic_dependency(p, laplacian),
             "l_err": world * user_error(p, g)}
    loss = parts["l_vis"] + cfg.lambda1 * parts["l_sem"] + cfg.lambda2 * parts["l_err"]
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}


def make_optimizers(model: RefineNet, cfg: RefineConfig):
    """(ϕ0's Adam over every layer, the refinement's SGD with its step schedule over the layers
    `cfg.train_layers` names). With "visual", L_final moves only the visual features and ϕ0's
    classifier keeps each tag's scale: per-tag refinement mAP rises as much as when every layer
    trains, while the per-image ranking across tags (miAP) falls far less (README, refinement)."""
    init = torch.optim.Adam(model.parameters(), lr=cfg.init_lr)
    trained = model.visual.parameters() if cfg.train_layers == "visual" else model.parameters()
    sgd = torch.optim.SGD(trained, lr=cfg.lr, momentum=cfg.momentum)
    return init, sgd, torch.optim.lr_scheduler.StepLR(sgd, step_size=cfg.lr_step_epochs, gamma=0.1)


@torch.no_grad()
def refine_scores(model: RefineNet, x: torch.Tensor, batch_size: int = 65_536) -> torch.Tensor:
    """p = σ(ϕ(x)) for every image (refinement on training images, annotation on new ones)."""
    model.eval()
    return torch.cat([torch.sigmoid(model(x[lo : lo + batch_size])) for lo in range(0, len(x), batch_size)]).cpu()


@torch.no_grad()
def refine_features(model: RefineNet, x: torch.Tensor, batch_size: int = 65_536) -> np.ndarray:
    """The visual features v = ϕ(i) of every image, (N, hidden) float32."""
    model.eval()
    return torch.cat([model.features(x[lo : lo + batch_size]) for lo in range(0, len(x), batch_size)]).cpu().numpy()
