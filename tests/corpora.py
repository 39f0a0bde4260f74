"""Generated corpora the tests share: a split manifest with features, and the same loaded
into targets and aligned features for in-process training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tagray.config import load_config
from tagray.data.normalize import NormalizerConfig, TagNormalizer, Vocabulary
from tagray.data.schema import read_manifest, write_manifest
from tagray.data.split import SplitConfig, assign_splits
from tagray.data.synth import SynthConfig, synthesize
from tagray.features.store import read_features
from tagray.heads.targets import build_targets, prepare_vocabulary


def split_corpus(out: Path, images: int, seed: int, feature_dim: int, **synth) -> dict:
    """`synth --features-only` under out/corpus (other SynthConfig fields in `synth`) and its
    manifest split by user at out/manifest.parquet: {"dir", "manifest", "features", "truth"}."""
    written = synthesize(SynthConfig(images=images, seed=seed, feature_dim=feature_dim, **synth), str(out / "corpus"),
                         features_only=True)
    manifest = str(out / "manifest.parquet")
    write_manifest(assign_splits(read_manifest(written["manifest"]), SplitConfig(seed=0)), manifest)
    return {"dir": out, "manifest": manifest, "features": written["features"], "truth": written["truth"]}


@dataclass
class Loaded:
    vocab: Vocabulary
    normalizer: TagNormalizer
    targets: pa.Table  # the whole manifest's
    train: pa.Table  # the train split's targets
    features: pa.Table
    truth: str  # truth.json path


def load_corpus(out: Path, images: int, seed: int = 1, feature_dim: int = 128) -> Loaded:
    """A split corpus read back as the trainers see it (vocabulary of the train split)."""
    corpus = split_corpus(out, images, seed, feature_dim)
    manifest = read_manifest(corpus["manifest"])
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab)
    features, _ = read_features(corpus["features"])
    train = targets.filter(pc.equal(targets.column("split"), "train"))
    return Loaded(vocab, normalizer, targets, train, features, corpus["truth"])
