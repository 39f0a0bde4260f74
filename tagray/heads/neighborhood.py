"""The metadata-neighbourhood model of seed 003 (§3, SPEC §3.4), plain PyTorch.

An image x and a neighbourhood z = {z_1, …, z_m} (m of its M nearest images by Jaccard
distance on metadata, tagray/data/jaccard.py) are scored by

    v_x = ReLU(W_x φ(x) + b_x)                       (eq. 4)
    v_z = max_i ReLU(W_z φ(z_i) + b_z)  (elementwise) (eq. 5)
    f(x, z) = W_y [v_x; v_z] + b_y                   (eq. 6)

trained with one-vs-all logistic loss on one sampled neighbourhood per step; at test time
s(x) = mean of f over `test_samples` sampled neighbourhoods (eq. 1). Images with fewer than
m neighbours use the ones they have; with none, v_z = 0 (the max over an empty set of ReLU
outputs, which are ≥ 0).

φ is standardised first, per dimension, with the training images' mean and standard deviation
(`NeighborsConfig.standardize`; buffers of the network, so a saved model carries them). Not in
the paper: its h, L2 3e-3 and RMSProp lr were chosen for AlexNet fc7 features; on features of
~D^-1/2 per dimension (unit-norm embeddings, the synthetic corpus's) the same steps barely move
what W_x φ computes while the L2 pulls W_x to 0 (BENCHMARKS, *Shipped defaults*: test mAP_L at
20,000 images 0.617 unstandardised at lr 1e-3, 0.884 standardised at 1e-3, 0.929 at 3e-4). With
the z-score the settings do not depend on the backbone's scale: training on c·φ + b gives the
model trained on φ.

`neighbors_step` is the one training step; its recipe (batches, validation, best epoch) is
tagray/heads/recipes/neighbors.py, run in-process, on Ray Train and in Ray Tune by heads/recipe.run_recipe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tagray.config import ConfigError
from tagray.heads.standardize import StandardizedInput

log = logging.getLogger(__name__)

METADATA = ("tags", "sets", "groups")
TARGETS = ("tags", "labels")
SEARCHES = ("index", "lsh")
# The settings an image's Jaccard neighbours depend on (with the data), `max_rank` (M) aside: every
# search ranks a row's candidates by similarity, then by the lower index, and its candidates do not
# depend on M, so the M nearest are the first M columns of the M' ≥ M nearest (tests/test_tune_shared.py)
NEIGHBOR_SETTINGS = ("metadata", "tau", "search", "max_posting", "lsh_bands", "lsh_rows", "lsh_window", "seed")


@dataclass(frozen=True)
class NeighborsConfig:
    head: str = "neighbors"
    metadata: str = "tags"  # tags | sets | groups: what the Jaccard distance compares (eq. 3)
    tau: int = 5000  # tags only: the τ most frequent training tags define the sets (paper: 5000)
    m: int = 3  # neighbourhood size (paper: 3)
    max_rank: int = 6  # M: neighbourhoods are m-subsets of the M nearest (paper: 6)
    search: str = "index"  # index: exact inverted index; lsh: approximate MinHash LSH (tags at millions of images)
    max_posting: int | None = None  # index, approximate: values on more images than this make no candidates (None: exact)
    lsh_bands: int = 16  # lsh: bands of the signature (more: higher recall, more candidates)
    lsh_rows: int = 2  # lsh: signature rows per band (more: fewer, more similar candidates)
    lsh_window: int = 10  # lsh: each image is paired with at most 2·window images of each bucket
    target: str = "tags"  # tags: learn from user tags (weak); labels: from ground-truth labels (the paper)
    hidden: int = 500  # h (paper: 500)
    dropout: float = 0.5  # on v_x and v_z (paper: 0.5)
    l2: float = 3e-3  # L2 on W_x, W_z, W_y (paper: 3e-3)
    lr: float = 3e-4  # RMSProp on standardised features (paper: 1e-4 on raw fc7; BENCHMARKS, *Shipped defaults*: the best at 20,000 images, 0.01 below 1e-4 at 3,000, faster than 1e-4 on seed 003's corpus)
    standardize: bool = True  # z-score φ per dimension with the training images' mean and std (not in the paper: see above)
    batch_size: int = 50  # over all workers (paper: 50)
    epochs: int = 10  # at least (paper: 10, keeping the best epoch on validation); more when they are under min_steps steps
    min_steps: int = 4000  # epochs = max(epochs, ⌈min_steps / steps per epoch⌉): the paper's 10 epochs were ~30k steps; 10 epochs of 3,000 images are 480
    max_epochs: int = 200  # the most epochs min_steps may ask for (early stopping ends most runs before)
    patience: int | None = 5  # early stopping: stop after this many epochs without a better validation mAP (None: run them all)
    test_samples: int = 10  # neighbourhoods averaged at test time (paper: 10)
    seed: int = 0
    checkpoint_every: int = 500  # Ray Train: steps between checkpoints (and every epoch)
    normalizer: str = "normalize.yaml"  # tag normaliser settings (path, or name in configs/)

    def __post_init__(self) -> None:
        if self.head != "neighbors":
            raise ConfigError(f"NeighborsConfig is the neighbors head, got head={self.head!r}")
        if self.metadata not in METADATA:
            raise ConfigError(f"metadata must be one of {', '.join(METADATA)}, got {self.metadata!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 1 <= self.m <= self.max_rank:
            raise ConfigError(f"need 1 ≤ m ≤ max_rank (M), got m={self.m}, max_rank={self.max_rank}")
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if self.search == "lsh" and self.max_posting is not None:
            raise ConfigError("max_posting caps the inverted index (search: index); with search: lsh leave it null")
        if min(self.lsh_bands, self.lsh_rows, self.lsh_window) < 1:
            raise ConfigError("lsh_bands, lsh_rows and lsh_window must be ≥ 1")
        if self.max_posting is not None and self.max_posting < 1:
            raise ConfigError(f"max_posting must be ≥ 1 (or null for exact search), got {self.max_posting}")
        if self.min_steps < 0 or self.max_epochs < 1 or (self.patience is not None and self.patience < 1):
            raise ConfigError(f"need min_steps ≥ 0, max_epochs ≥ 1 and patience ≥ 1 (or null), got {self.min_steps}, "
                              f"{self.max_epochs}, {self.patience}")
        if min(self.tau, self.hidden, self.batch_size, self.epochs, self.test_samples, self.checkpoint_every) < 1:
            raise ConfigError("tau, hidden, batch_size, epochs, test_samples and checkpoint_every must be ≥ 1")
        if not (0 <= self.dropout < 1 and self.l2 >= 0 and self.lr > 0):  # NaN fails too
            raise ConfigError(f"need 0 ≤ dropout < 1, l2 ≥ 0, lr > 0; got {self.dropout}, {self.l2}, {self.lr}")

    def lsh_settings(self) -> dict | None:
        """The MinHash LSH arguments of `jaccard_neighbors_lsh`, or None for the inverted index."""
        if self.search != "lsh":
            return None
        return {"bands": self.lsh_bands, "rows": self.lsh_rows, "window": self.lsh_window, "seed": self.seed}


class NeighborhoodNet(StandardizedInput, nn.Module):
    """f(x, z) of eq. 4–6 over a batch: x (B, D), z (B, m, D) with a validity mask (B, m). The
    buffers `feature_shift`, `feature_scale` (identity until `standardize_features`) z-score φ
    before W_x and W_z."""

    def __init__(self, dim: int, labels: int, hidden: int = 500, dropout: float = 0.5) -> None:
        super().__init__()
        self.dim, self.tags, self.hidden = dim, labels, hidden
        self._register_standardizer(dim)
        self.image = nn.Linear(dim, hidden)  # W_x, b_x
        self.neighbor = nn.Linear(dim, hidden)  # W_z, b_z
        self.out = nn.Linear(2 * hidden, labels)  # W_y, b_y
        self.drop = nn.Dropout(dropout)
        for layer in (self.image, self.neighbor, self.out):  # He et al. initialisation (the paper's [21])
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, z: torch.Tensor, z_mask: torch.Tensor) -> torch.Tensor:
        x, z = self.standardized(x), self.standardized(z)
        v_x = torch.relu(self.image(x))
        v_zi = torch.relu(self.neighbor(z)).masked_fill(~z_mask.unsqueeze(-1), 0.0)
        v_z = v_zi.amax(dim=1) if z.shape[1] else torch.zeros_like(v_x)
        return self.out(torch.cat([self.drop(v_x), self.drop(v_z)], dim=1))

    def weight_norm2(self) -> torch.Tensor:
        """‖W_x‖² + ‖W_z‖² + ‖W_y‖² (biases are not regularised)."""
        return sum(layer.weight.pow(2).sum() for layer in (self.image, self.neighbor, self.out))


def sample_neighborhoods(neighbors: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly drawn m-subset of each row's valid neighbours (−1 marks none): (B, M) → (B, m),
    −1 where a row has fewer than m."""
    keys = rng.random(neighbors.shape)
    keys[neighbors < 0] = np.inf  # missing neighbours sort last
    pick = np.argsort(keys, axis=1)[:, :m]
    return np.take_along_axis(neighbors, pick, axis=1)


def gather_neighborhood(x_all: torch.Tensor, chosen: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, m, D) and mask (B, m) of the chosen neighbour rows of `x_all`."""
    mask = torch.from_numpy(chosen >= 0).to(x_all.device)
    idx = torch.from_numpy(np.maximum(chosen, 0).astype(np.int64)).to(x_all.device)
    return x_all[idx], mask


def neighbors_loss(logits: torch.Tensor, y: torch.Tensor, model: NeighborhoodNet, l2: float) -> torch.Tensor:
    """Sum over labels of the one-vs-all logistic loss, mean over images, + l2 · Σ‖W‖²."""
    data = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1).mean()
    return data + l2 * model.weight_norm2()


def make_optimizer(model: nn.Module, cfg: NeighborsConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(model.parameters(), lr=cfg.lr)


def neighbors_step(
    model: NeighborhoodNet, forward: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, z: torch.Tensor,
    z_mask: torch.Tensor, y: torch.Tensor, l2: float,
) -> float:
    """One RMSProp step on a batch; `forward` is the model or its DDP wrapper."""
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = neighbors_loss(forward(x, z, z_mask), y, model, l2)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.inference_mode()
def neighborhood_scores(
    model: NeighborhoodNet, x: torch.Tensor, neighbors: np.ndarray, m: int, samples: int, seed: int = 0,
    batch_size: int = 4096,
) -> torch.Tensor:
    """s(x) = mean over `samples` sampled neighbourhoods of f(x, z) (eq. 1): (N, labels) scores.
    `neighbors` index rows of `x` (neighbours come from the same split)."""
    model.eval()
    rng = np.random.default_rng(seed)
    out = torch.zeros(len(x), model.tags, device=x.device)
    for _ in range(samples):
        chosen = sample_neighborhoods(neighbors, m, rng)
        for lo in range(0, len(x), batch_size):
            z, mask = gather_neighborhood(x, chosen[lo : lo + batch_size])
            out[lo : lo + batch_size] += model(x[lo : lo + batch_size], z, mask)
    return (out / samples).cpu()

