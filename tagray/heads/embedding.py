"""The word-embedding head (seed 004, SPEC §3.2): an MLP h maps image features into the
word-vector space, f = h(x) (eq. 2), and a word t scores f·v_t. Word vectors are trained
jointly with h (unless `fixed_vectors`), held in a `WordTable`-like store that the step
pulls rows from and pushes sparse gradients to.

`embed_step` is the one training step; its recipe is tagray/heads/recipes/embed.py, run in-process
(a WordTable) and on Ray Train (the shard server) by heads/recipe.run_recipe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tagray.config import ConfigError
from tagray.heads.calibrate import fit_platt
from tagray.heads.embed_losses import fast0tag, fast0tag_full, full_xent, sampled_xent
from tagray.heads.samplers import NEGATIVE_SAMPLERS, log_noise_prior, sample_positives
from tagray.heads.standardize import StandardizedInput
from tagray.heads.targets import multi_hot
from tagray.heads.word_table import OPTIMIZERS

log = logging.getLogger(__name__)

LOSSES = ("xent", "fast0tag")


@dataclass(frozen=True)
class EmbedConfig:
    head: str = "embed"
    hidden: tuple[int, ...] = (1024,)  # h's hidden layers (paper: 4096, 8192, 2048; smaller for CPU)
    word_dim: int = 300  # d, when no pretrained vectors are given (the paper: 300)
    dropout: float = 0.0  # between h's hidden layers
    loss: str = "xent"  # xent: eq. 1 (sampled) or full cross-entropy; fast0tag: eq. 5
    sampled: bool = True  # sample P positives and N negatives (false: every word, every tag)
    positives: int = 5  # P, uniform with replacement from the image's tags (paper: 5)
    negatives: int = 10  # N (paper: 10)
    alpha: float = 0.01  # co-occurrence term of eq. 1 (paper: 0.01)
    beta: float = 1.0  # Fast0Tag's scale (eq. 5)
    sampler: str = "frequency"  # negatives: frequency | adjacent | pool (seed 004 §3.3)
    sampler_power: float = 0.75  # frequency/pool: P(t) ∝ count^power (word2vec)
    pool_size: int = 100_000  # pool: words pre-sampled per epoch
    fixed_vectors: bool = False  # baseline "Fixed WV": word vectors are not trained
    epochs: int = 10  # at most (the cosine schedule's length); the best on validation is kept: at 20,000 images epoch 1 (BENCHMARKS)
    batch_size: int = 256  # images per step, over all workers
    lr: float = 1e-3  # Adam on h (peak, cosine schedule); 3e-3 before φ was standardised (BENCHMARKS, *Shipped defaults*)
    standardize: bool = True  # z-score φ per dimension with the training images' moments (heads/standardize.py; not in the paper)
    schedule: str = "cosine"  # constant | cosine
    weight_decay: float = 0.0
    word_optimizer: str = "adagrad"  # sgd | adagrad, applied by the word store to pushed rows
    word_lr: float = 0.05
    vectors: str | None = None  # pretrained word vectors (GloVe / word2vec text), path or s3:// URI
    max_words: int | None = None  # read at most this many pretrained words (files list frequent words first)
    init_scale: float = 0.1  # random word vectors: N(0, init_scale²)
    oov_steps: int = 300  # out-of-vocabulary snapping (eq. 3–4): Adam steps; 0 turns it off
    oov_lr: float = 0.05
    oov_anchors: int = 4096  # words each snapping step compares against (a sample of V_∪)
    seed: int = 0
    checkpoint_every: int = 200  # Ray Train: steps between checkpoints (and on finish)
    calibration_images: int = 20_000  # tagged val images for per-tag Platt scaling of user-tag scores (0: off)
    # validation after every epoch: mAP per label of the content scores f·v_t on a seeded sample of
    # this many val images (labels where they have them, else their user tags); the model written is
    # the best epoch's, h and word vectors together (0: off — the last epoch's, as in the paper)
    val_images: int = 5_000
    patience: int | None = None  # stop after this many epochs without a better validation mAP (null: run them all)
    normalizer: str = "normalize.yaml"

    def __post_init__(self) -> None:
        if self.head != "embed":
            raise ConfigError(f"EmbedConfig is the embed head's, got head={self.head!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.sampler not in NEGATIVE_SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(NEGATIVE_SAMPLERS)}, got {self.sampler!r}")
        if self.word_optimizer not in OPTIMIZERS:
            raise ConfigError(f"word_optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.word_optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if min(self.positives, self.negatives, self.epochs, self.batch_size, self.word_dim, self.checkpoint_every) < 1:
            raise ConfigError("positives, negatives, epochs, batch_size, word_dim and checkpoint_every must be ≥ 1")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer sizes must be ≥ 1, got {self.hidden}")
        # each check is written so that NaN fails it too (every comparison with NaN is false)
        if not (self.lr > 0 and self.word_lr > 0 and self.oov_lr > 0):
            raise ConfigError(f"lr, word_lr and oov_lr must be > 0, got {self.lr}, {self.word_lr}, {self.oov_lr}")
        if not (0 <= self.dropout < 1 and self.weight_decay >= 0 and self.alpha >= 0 and self.beta > 0):
            raise ConfigError(f"need 0 ≤ dropout < 1, weight_decay ≥ 0, alpha ≥ 0, beta > 0; got {self.dropout}, "
                              f"{self.weight_decay}, {self.alpha}, {self.beta}")
        if not (self.sampler_power >= 0 and self.init_scale > 0):
            raise ConfigError(f"need sampler_power ≥ 0 and init_scale > 0, got {self.sampler_power}, {self.init_scale}")
        if self.pool_size < 1 or self.oov_steps < 0 or self.oov_anchors < 1 or self.calibration_images < 0:
            raise ConfigError("need pool_size ≥ 1, oov_steps ≥ 0 (0: off), oov_anchors ≥ 1 and calibration_images ≥ 0 "
                              "(0: off)")
        if self.val_images < 0 or (self.patience is not None and self.patience < 1):
            raise ConfigError(f"need val_images ≥ 0 (0: off) and patience ≥ 1 (or null), got {self.val_images}, "
                              f"{self.patience}")
        if self.max_words is not None and self.max_words < 1:
            raise ConfigError(f"max_words must be ≥ 1 (or null: all), got {self.max_words}")


class TagMLP(StandardizedInput, nn.Module):
    """h(x): D → hidden… → d, ReLU between layers, linear output (eq. 2), on φ z-scored by the
    buffers `feature_shift` / `feature_scale` (heads/standardize.py; identity unless
    `EmbedConfig.standardize` set them from the training images)."""

    def __init__(self, dim: int, hidden: tuple[int, ...], out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self._register_standardizer(dim)
        layers: list[nn.Module] = []
        sizes = (dim, *hidden)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-1], out))
        self.net = nn.Sequential(*layers)
        self.dim, self.out = dim, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardized(x))


class EmbedTagger(nn.Module):
    """h plus the vectors of the T training tags: scores s_t = f·v_t (the evaluation interface
    of the linear heads; there is no π and no β).

    User-tag prediction ("what a user would tag") is P(y_t = 1|x) = σ(a_t s_t + b_t): per-tag
    Platt scaling fitted on the validation split after training (`calibrate_user_tags`), or,
    without it, a_t = 1 and b_t = log q(t) of the negative sampler the head was trained with
    (samplers.log_noise_prior; zeros for the unsampled loss). Content (annotation, retrieval)
    ranks by s_t either way; a_t ≥ 0, so P(y_t) never reverses a tag's ranking of images (a_t = 0
    flattens it to the tag's base rate)."""

    robust = False

    def __init__(self, mlp: TagMLP, tag_vectors: torch.Tensor, tag_offset: torch.Tensor | None = None,
                 tag_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("tag_vectors", tag_vectors)
        self.register_buffer("tag_offset", tag_offset if tag_offset is not None else torch.zeros(len(tag_vectors)))
        self.register_buffer("tag_scale", tag_scale if tag_scale is not None else torch.ones(len(tag_vectors)))

    @property
    def tags(self) -> int:
        return self.tag_vectors.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) @ self.tag_vectors.T

    def probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ(a s + b), log σ(s)): user-tag probabilities and content scores (class docstring)."""
        s = self(x)
        return torch.sigmoid(s * self.tag_scale + self.tag_offset), nn.functional.logsigmoid(s)


def calibrate_user_tags(mlp: TagMLP, tag_vectors: torch.Tensor, x: torch.Tensor, tag_ids: np.ndarray,
                        block: int = 256, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tag Platt scaling (a_t, b_t) of the user-tag scores s = h(x)·v_t on held-out images
    `x` whose user tags are `tag_ids` ((N, W) padded with −1): `calibrate.fit_platt` against
    y_t = [t among the image's tags], over blocks of `block` tags (float64 temporaries of N × block
    each: ≈ 40 MB apiece at 20,000 images)."""
    with torch.inference_mode():
        mlp.eval()
        f = torch.cat([mlp(x[lo : lo + batch_size]) for lo in range(0, len(x), batch_size)])
    ids = torch.as_tensor(tag_ids)
    scale, offset = [], []
    for lo in range(0, len(tag_vectors), block):
        hi = min(lo + block, len(tag_vectors))
        shifted = torch.where((ids >= lo) & (ids < hi), ids - lo, -1)
        with torch.inference_mode():
            s = f @ tag_vectors[lo:hi].T
        a, b = fit_platt(s, multi_hot(shifted, hi - lo, torch.bool))
        scale.append(a)
        offset.append(b)
    return torch.cat(scale), torch.cat(offset)


def tag_log_prior(cfg: EmbedConfig, counts: np.ndarray) -> torch.Tensor:
    """log q(t) of the head's negative sampler over `counts` (zeros when not sampled)."""
    if not cfg.sampled:
        return torch.zeros(len(counts))
    return torch.from_numpy(log_noise_prior(cfg.sampler, counts, cfg.sampler_power))


def new_mlp(dim: int, word_dim: int, cfg: EmbedConfig) -> TagMLP:
    torch.manual_seed(cfg.seed)
    return TagMLP(dim, cfg.hidden, word_dim, cfg.dropout)


def make_optimizer(mlp: nn.Module, cfg: EmbedConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(mlp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: EmbedConfig, total_steps: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def step_ids(tag_ids: np.ndarray, cfg: EmbedConfig, sampler, rng: np.random.Generator, words: int):
    """The words one step touches: (unique ids to pull, (B, P+N) positions into them) when
    sampled; (every word id, None) when not."""
    if not cfg.sampled:
        return np.arange(words, dtype=np.int64), None
    pos = sample_positives(tag_ids, cfg.positives, rng)
    neg = sampler.negatives(tag_ids, cfg.negatives, rng)
    ids, inverse = np.unique(np.concatenate([pos, neg], axis=1), return_inverse=True)
    return ids, inverse.reshape(len(tag_ids), cfg.positives + cfg.negatives)


def embed_loss(f: torch.Tensor, rows: torch.Tensor, where, tag_ids: torch.Tensor, cfg: EmbedConfig) -> torch.Tensor:
    """The configured loss of a batch given the pulled rows (see step_ids)."""
    if where is not None:
        where = torch.as_tensor(where, device=f.device)
        vp, vn = rows[where[:, : cfg.positives]], rows[where[:, cfg.positives :]]
        return sampled_xent(f, vp, vn, cfg.alpha) if cfg.loss == "xent" else fast0tag(f, vp, vn, cfg.beta)
    scores = f @ rows.T
    return full_xent(scores, tag_ids) if cfg.loss == "xent" else fast0tag_full(scores, tag_ids, cfg.beta)


def embed_step(
    forward: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    tag_ids: np.ndarray,
    table,
    cfg: EmbedConfig,
    sampler,
    rng: np.random.Generator,
    words: int,
    world: int = 1,
) -> float:
    """One step: sample words, pull their rows, loss, backward, Adam on h, push the rows'
    gradients (divided by `world`: each of the data-parallel workers pushes its own, and h's
    gradients are averaged by DDP, so the word update is the mean over workers too)."""
    ids, where = step_ids(tag_ids, cfg, sampler, rng, words)
    rows = torch.from_numpy(table.pull(ids)).to(x.device).requires_grad_(not cfg.fixed_vectors)
    loss = embed_loss(forward(x), rows, where, torch.from_numpy(tag_ids).to(x.device), cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if not cfg.fixed_vectors:
        table.push(ids, rows.grad.cpu().numpy() / world)
    return float(loss.detach())
