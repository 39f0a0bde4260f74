"""The word-embedding head (seed 004): loss cost against vocabulary size, the embedding shard
server's throughput and memory, and tagging quality against RLR.

1. `losses`: time per epoch (E images) of sampled cross-entropy (eq. 1), full cross-entropy,
   sampled Fast0Tag (eq. 5) and full Fast0Tag at V = 1k, 10k, 100k words, in one process with
   the dense WordTable (the loss and the rows it touches are what differ; Ray is not timed).
   Synthetic tags: Zipf-distributed over V words, 1–10 per image.
2. `shards`: pull / push rows per second through K = 1, 2, 4 shard actors (batches of the
   unique ids a step of B images × (P+N) samples touches), against the same WordTable
   called in-process (the baseline, same run).
3. `memory`: a 432,000 × 300 matrix (the paper's) in 2 shard actors; a trainer actor holding
   only the MLP pulls and pushes through them. Resident memory of each process, against a
   trainer that holds the matrix itself.
4. `quality`: P/R/F1@5 of the embed head (sampled, Ray-free trainer) against RLR on the same
   synthetic corpus (`synth --features-only`), test split.

    .venv/bin/python benchmarks/embed.py            # all four; JSON to benchmarks/results/embed.json
    .venv/bin/python benchmarks/embed.py --parts losses --vocab 1000 10000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tagray.heads.embedding import EmbedConfig, embed_step, make_optimizer, new_mlp
from tagray.heads.samplers import make_sampler
from tagray.heads.word_table import WordTable


def rss_mib() -> float:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**20


def uss_mib() -> float:
    """Memory held by this process alone (not shared libraries or Ray's object store)."""
    import psutil

    return psutil.Process(os.getpid()).memory_full_info().uss / 2**20


def zipf_tags(images: int, vocab: int, rng: np.random.Generator, width: int = 10) -> np.ndarray:
    """(images, width) padded tag ids, 1–width per image, Zipf(1) over the vocabulary."""
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    ids = np.full((images, width), -1, np.int64)
    counts = rng.integers(1, width + 1, images)
    for i, c in enumerate(counts):
        ids[i, :c] = rng.choice(vocab, c, replace=False, p=p)
    return ids


def time_epoch(cfg: EmbedConfig, x: torch.Tensor, tags: np.ndarray, vocab: int, dim: int) -> float:
    rng = np.random.default_rng(0)
    table = WordTable(rng.normal(0, 0.1, (vocab, dim)).astype(np.float32), "adagrad", 0.05)
    counts = np.bincount(tags[tags >= 0], minlength=vocab)
    mlp = new_mlp(x.shape[1], dim, cfg)
    opt = make_optimizer(mlp, cfg)
    sampler = make_sampler(cfg.sampler, counts, cfg.sampler_power, cfg.pool_size)
    sampler.new_epoch(rng)
    b = cfg.batch_size
    embed_step(mlp, opt, x[:b], tags[:b], table, cfg, sampler, rng, vocab)  # warm-up
    t0 = time.perf_counter()
    for lo in range(0, len(x) - b + 1, b):
        embed_step(mlp, opt, x[lo : lo + b], tags[lo : lo + b], table, cfg, sampler, rng, vocab)
    return time.perf_counter() - t0


def bench_losses(vocabs: list[int], images: int, dim: int, batch: int, full_fast0tag_limit_gib: float) -> list[dict]:
    rng = np.random.default_rng(1)
    x = torch.randn(images, 256)
    rows = []
    for vocab in vocabs:
        tags = zipf_tags(images, vocab, rng)
        row = {"vocab": vocab, "images": images, "batch": batch, "dim": dim}
        variants = {
            "sampled_xent": dict(loss="xent", sampled=True),
            "full_xent": dict(loss="xent", sampled=False),
            "sampled_fast0tag": dict(loss="fast0tag", sampled=True),
            "full_fast0tag": dict(loss="fast0tag", sampled=False),
        }
        for name, kw in variants.items():
            if name == "full_fast0tag":
                gib = batch * tags.shape[1] * vocab * 4 * 4 / 2**30  # pairs tensor, its softplus, grads
                if gib > full_fast0tag_limit_gib:
                    row[name] = None
                    row[f"{name}_skipped"] = f"needs ~{gib:.0f} GiB (B·W·V pairs): does not scale"
                    print(f"V={vocab:>7} {name:<17} skipped ({row[f'{name}_skipped']})", flush=True)
                    continue
            cfg = EmbedConfig(hidden=(512,), batch_size=batch, **kw)
            row[name] = time_epoch(cfg, x, tags, vocab, dim)
            print(f"V={vocab:>7} {name:<17} {row[name]:7.2f} s/epoch", flush=True)
        row["full_over_sampled_xent"] = row["full_xent"] / row["sampled_xent"]
        rows.append(row)
    return rows


def bench_shards(vocab: int, dim: int, batch: int, steps: int, shard_counts: list[int]) -> list[dict]:

    from tagray.train.shards import ShardedWordTable

    rng = np.random.default_rng(2)
    init = rng.normal(0, 0.1, (vocab, dim)).astype(np.float32)
    tags = zipf_tags(batch * steps, vocab, rng)
    sampler = make_sampler("frequency", np.bincount(tags[tags >= 0], minlength=vocab), 0.75, 0)
    from tagray.heads.samplers import sample_positives

    id_batches = []
    for s in range(steps):
        part = tags[s * batch : (s + 1) * batch]
        id_batches.append(np.unique(np.concatenate([sample_positives(part, 5, rng), sampler.negatives(part, 10, rng)], 1)))
    grads = [rng.normal(size=(len(ids), dim)).astype(np.float32) for ids in id_batches]
    rows_total = sum(len(ids) for ids in id_batches)

    def run(table) -> dict:
        t0 = time.perf_counter()
        for ids in id_batches:
            table.pull(ids)
        t_pull = time.perf_counter() - t0
        t0 = time.perf_counter()
        for ids, g in zip(id_batches, grads, strict=True):
            table.push(ids, g)
        t_push = time.perf_counter() - t0
        return {"pull_rows_per_s": rows_total / t_pull, "push_rows_per_s": rows_total / t_push,
                "step_ms": 1000 * (t_pull + t_push) / steps}

    out = [{"store": "in-process WordTable", "shards": 0, **run(WordTable(init, "adagrad", 0.05))}]
    print(f"in-process: {out[-1]}", flush=True)
    for k in shard_counts:
        table = ShardedWordTable.create(init, k, "adagrad", 0.05, num_cpus=0)
        try:
            run(table)  # warm-up (actor start, first transfers)
            out.append({"store": "shard server", "shards": k, **run(table)})
        finally:
            table.kill()
        print(f"{k} shard(s): {out[-1]}", flush=True)
    for row in out:
        row.update(rows_per_step=rows_total / steps, vocab=vocab, dim=dim)
    return out


class _Trainer:
    """A stand-in training worker: the MLP, and either the shard server or its own matrix."""

    def __init__(self, dim_in: int, hidden: tuple[int, ...], vocab: int, dim: int, names: list[str] | None) -> None:
        from tagray.train.shards import ShardedWordTable

        self.rss_start, self.uss_start = rss_mib(), uss_mib()
        self.cfg = EmbedConfig(hidden=hidden, batch_size=256)
        self.mlp = new_mlp(dim_in, dim, self.cfg)
        self.opt = make_optimizer(self.mlp, self.cfg)
        if names:
            self.table = ShardedWordTable.connect(names, vocab, dim)
        else:
            self.table = WordTable(np.random.default_rng(0).normal(0, 0.1, (vocab, dim)).astype(np.float32), "adagrad", 0.05)
        self.vocab = vocab
        rng = np.random.default_rng(3)
        self.tags = zipf_tags(256 * 4, vocab, rng)
        self.sampler = make_sampler("frequency", np.bincount(self.tags[self.tags >= 0], minlength=vocab), 0.75, 0)
        self.x = torch.randn(256 * 4, dim_in)

    def run(self, steps: int) -> dict:
        rng = np.random.default_rng(4)
        t0 = time.perf_counter()
        for s in range(steps):
            lo = (s % 4) * 256
            embed_step(self.mlp, self.opt, self.x[lo : lo + 256], self.tags[lo : lo + 256], self.table, self.cfg,
                       self.sampler, rng, self.vocab)
        return {"rss_mib": rss_mib(), "rss_at_start_mib": self.rss_start, "uss_mib": uss_mib(),
                "uss_at_start_mib": self.uss_start, "step_ms": 1000 * (time.perf_counter() - t0) / steps}


def bench_memory(vocab: int, dim: int, shards: int, steps: int) -> dict:
    import ray

    from tagray.train.shards import ShardedWordTable

    init = np.random.default_rng(5).normal(0, 0.1, (vocab, dim)).astype(np.float32)
    matrix_mib = init.nbytes / 2**20
    table = ShardedWordTable.create(init, shards, "adagrad", 0.05, num_cpus=0)
    del init
    trainer_cls = ray.remote(num_cpus=0)(_Trainer)
    try:
        trainer = trainer_cls.remote(512, (1024,), vocab, dim, table.names)
        with_server = ray.get(trainer.run.remote(steps))
        stats = table.stats()
        ray.kill(trainer)
        alone = trainer_cls.remote(512, (1024,), vocab, dim, None)
        holding_matrix = ray.get(alone.run.remote(steps))
        ray.kill(alone)
    finally:
        table.kill()
    return {
        "vocab": vocab, "dim": dim, "matrix_mib": matrix_mib, "shards": shards,
        "shard_rss_mib": [s["rss_bytes"] / 2**20 for s in stats],
        "shard_uss_mib": [s["uss_bytes"] / 2**20 for s in stats],
        "shard_table_mib": [s["bytes"] / 2**20 for s in stats],
        "trainer_with_shard_server": with_server,
        "trainer_holding_matrix": holding_matrix,
    }


def bench_quality(images: int, epochs: int) -> dict:
    import pyarrow.compute as pc

    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import read_manifest
    from tagray.data.split import SplitConfig, assign_splits
    from tagray.data.synth import SynthConfig, synthesize
    from tagray.data.word_vectors import synthetic_word_vectors, word_table_init
    from tagray.eval.report import EvalConfig, evaluate_head
    from tagray.features.store import read_features
    from tagray.heads.embedding import EmbedTagger, tag_log_prior
    from tagray.heads.fit import HeadConfig, align
    from tagray.heads.recipes.embed import fit_embed
    from tagray.heads.recipes.linear import fit
    from tagray.heads.targets import build_targets, dense, padded_ids, prepare_vocabulary

    with tempfile.TemporaryDirectory() as d:
        written = synthesize(SynthConfig(images=images, seed=1, feature_dim=128), d, features_only=True)
        manifest = assign_splits(read_manifest(written["manifest"]), SplitConfig(seed=0))
        features, _ = read_features(written["features"])
        truth = json.loads(Path(written["truth"]).read_text())
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab)
    train = targets.filter(pc.equal(targets.column("split"), "train"))
    x_all, found_all = align(features, train.column("image_id"))
    tagged = train.filter(pc.greater(pc.list_value_length(train.column("tag_ids")), 0))
    x, found = align(features, tagged.column("image_id"))
    ids = padded_ids(tagged.column("tag_ids").take(found), 16)
    words, vectors = synthetic_word_vectors(truth, 32)
    pretrained = ([normalizer.normalize_tag(w) for w in words], vectors)
    out = {"images": images, "tags": len(vocab), "metric": "P/R/F1@5 on the test split (tag prediction: user tags; "
           "annotation: ground-truth labels)"}
    cfgs = {"embed (sampled xent)": EmbedConfig(hidden=(256,), epochs=epochs),
            "embed (full xent)": EmbedConfig(hidden=(256,), epochs=epochs, sampled=False)}
    for name, cfg in cfgs.items():
        all_words, init, _ = word_table_init(vocab.tags, pretrained, cfg.word_dim, cfg.init_scale)
        counts = np.zeros(len(all_words))
        counts[: len(vocab)] = np.bincount(ids[ids >= 0], minlength=len(vocab))
        table = WordTable(init, cfg.word_optimizer, cfg.word_lr)
        t0 = time.perf_counter()
        mlp = fit_embed(x, ids, table, counts, cfg)
        seconds = time.perf_counter() - t0
        tagger = EmbedTagger(mlp, table.vectors[: len(vocab)].clone(), tag_log_prior(cfg, counts[: len(vocab)]))
        report, _ = evaluate_head(tagger, targets, features, EvalConfig(), "test", with_baselines=False)
        out[name] = {"seconds": seconds, "tag_prediction": report["tag_prediction"], "annotation": report["annotation"]}
        print(name, json.dumps(out[name]["tag_prediction"]), flush=True)
    y = dense(train.column("tag_ids").take(found_all), len(vocab))
    t0 = time.perf_counter()
    rlr = fit(x_all, y, HeadConfig(head="rlr", epochs=60, lr=0.01, weight_decay=1e-4))
    seconds = time.perf_counter() - t0
    report, _ = evaluate_head(rlr, targets, features, EvalConfig(), "test", with_baselines=True)
    out["rlr"] = {"seconds": seconds, "tag_prediction": report["tag_prediction"], "annotation": report["annotation"]}
    out["baselines"] = {k: {t: v[t] for t in ("tag_prediction", "annotation") if t in v} for k, v in report["baselines"].items()}
    print("rlr", json.dumps(out["rlr"]["tag_prediction"]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["losses", "shards", "memory", "quality"])
    p.add_argument("--vocab", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--epoch-images", type=int, default=5120, help="images per timed epoch (losses)")
    p.add_argument("--dim", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--full-fast0tag-limit-gib", type=float, default=6.0)
    p.add_argument("--shard-vocab", type=int, default=100_000)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--memory-vocab", type=int, default=432_000)
    p.add_argument("--quality-images", type=int, default=20_000)
    p.add_argument("--quality-epochs", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/embed.json")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
                    "torch_threads": torch.get_num_threads()}
    if {"shards", "memory"} & set(args.parts):
        from tagray.runtime import init_ray

        init_ray()
    if "losses" in args.parts:
        result["losses"] = bench_losses(args.vocab, args.epoch_images, args.dim, args.batch, args.full_fast0tag_limit_gib)
    if "shards" in args.parts:
        result["shards"] = bench_shards(args.shard_vocab, args.dim, args.batch, 30, args.shards)
    if "memory" in args.parts:
        result["memory"] = bench_memory(args.memory_vocab, args.dim, 2, 10)
        print(json.dumps(result["memory"], indent=1), flush=True)
    if "quality" in args.parts:
        result["quality"] = bench_quality(args.quality_images, args.quality_epochs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
