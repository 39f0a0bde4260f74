"""`tagray demo`: every stage that exists, end to end on a local Ray with generated data.

Today: synth (rendered JPEGs) → split by user → tag statistics → featurize (ResNet-18
with explicitly requested random weights: no pretrained weights ship with tagray) → train a
robust LR head on Ray Train → calibrate it on the labelled val images → evaluate on test →
train the word-embedding head (word vectors in the embedding shard server) → index the
images → search for a tagged word and for a word no image carries → evaluate it → index the
calibrated RLR model's predictions and serve it over HTTP (Ray Serve), with one tagging
and one search request.
Each stage prints where its outputs went; a summary closes the run and is saved as summary.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from typing import Any, TypeVar

from tagray import jsonio
from tagray.commands.calibrate import calibrate
from tagray.commands.common import command
from tagray.commands.evaluate import run_evaluation
from tagray.commands.evaluate import summary_lines as evaluate_lines
from tagray.commands.featurize import summary_line as featurize_line
from tagray.commands.stats import summary_lines
from tagray.config import load_config
from tagray.data import storage
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import read_manifest, write_manifest
from tagray.data.split import SplitConfig, assign_splits, split_sizes
from tagray.data.stats import plot_statistics, tag_statistics, write_statistics
from tagray.data.synth import SynthConfig, synthesize
from tagray.data.word_vectors import write_synthetic_word_vectors
from tagray.data.words import UNTAGGED_RELATED
from tagray.eval.inputs import load_inputs
from tagray.features.pipeline import FeaturizeConfig, featurize
from tagray.features.store import read_features
from tagray.heads.artifact import save_head
from tagray.heads.calibrate import CalibrateConfig
from tagray.heads.embed_artifact import load_embed_head
from tagray.heads.embedding import EmbedConfig
from tagray.heads.fit import HeadConfig
from tagray.index import IndexBuildConfig, build_index
from tagray.serve.index import WordIndex, build_image_index, save_image_index
from tagray.train.embed_run import train_embed
from tagray.train.run import train_head
from tagray.train.run_config import TrainRunConfig

C = TypeVar("C")


# What the demo changes from each stage's defaults — the dataclasses hold every other setting —
# and why. tests/test_config.py checks that each key is a field of its dataclass and differs from
# its default (a repeated default fails), and that no config is built here from a literal.
DEMO_SETTINGS: dict[type, dict[str, Any]] = {
    SynthConfig: {
        "images": 1500,  # a corpus that renders, featurizes and trains in minutes on a laptop
    },
    FeaturizeConfig: {
        "backbone": "resnet18",  # the smallest torchvision ResNet: CPU featurizing in seconds
        "weights": "random",  # no pretrained weights ship with tagray (the demo asks for random ones explicitly)
    },
    HeadConfig: {
        "epochs": 30,  # the demo corpus has few steps per epoch: more passes than the paper's corpora need
        "weight_decay": 1e-4,  # random-weight features of 1,500 images: L2 keeps W from fitting their noise
    },
    EmbedConfig: {
        "hidden": (256,),  # a quarter of the default h: 50-d synthetic word vectors and a tiny vocabulary
    },
    IndexBuildConfig: {
        "worker_cpus": 0.5,  # a 2-core laptop: the builder fits beside whatever earlier stages left running
    },
}
DEMO_WORD_DIM = 50  # synthetic word vectors written for the embed head (not a config field)


def demo_config(cls: type[C], **computed: Any) -> C:
    """`cls`'s defaults, the demo's DEMO_SETTINGS for it, then values computed from the arguments."""
    return cls(**{**DEMO_SETTINGS.get(cls, {}), **computed})


def build_parser() -> argparse.ArgumentParser:
    synth, features, head = DEMO_SETTINGS[SynthConfig], DEMO_SETTINGS[FeaturizeConfig], DEMO_SETTINGS[HeadConfig]
    p = argparse.ArgumentParser(prog="tagray demo", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--images", type=int, default=synth["images"], help=f"images to generate (default {synth['images']})")
    p.add_argument("--seed", type=int, default=SynthConfig.seed, help=f"seed of every stage (default {SynthConfig.seed})")
    p.add_argument("--backbone", default=features["backbone"],
                   help=f"torchvision backbone for featurize (default {features['backbone']})")
    p.add_argument("--weights", default=features["weights"],
                   help=f"backbone weights: path or s3:// URI, or 'random' (the default here: {features['weights']})")
    p.add_argument("--epochs", type=int, default=head["epochs"],
                   help=f"training epochs of the RLR and embed heads (default {head['epochs']})")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve app at the end (default 8000)")
    p.add_argument("--keep-serving", action="store_true", help="keep the Serve app up after the demo (Ctrl-C stops)")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    return p


def demo_queries(truth: dict, head, words: WordIndex | None) -> list[list[str]]:
    """A tagged concept, the word near it that no image carries (open vocabulary), and a
    two-word query — picked from what this (possibly tiny) corpus's vocabulary holds."""
    seen = [c["tag"] for c in truth["concepts"] if c["tag"] in head.vocab.index] or list(head.vocab.tags[:2])
    queries = [[seen[0]]]
    related = UNTAGGED_RELATED.get(seen[0])
    if words is not None and related in words.where:
        queries.append([related])
    if len(seen) > 1:
        queries.append(seen[:2])
    return queries


def _stage(name: str) -> float:
    print(f"\n=== {name}", flush=True)
    return time.perf_counter()


@command("demo")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tagray.runtime import init_ray

    t_start = time.perf_counter()
    init_ray(args.ray_address)
    out = args.out
    corpus_dir = storage.join(out, "corpus")
    summary: dict = {"out": out, "stages": {}}

    t0 = _stage("synth: rendering a tagged-photo corpus on Ray")
    # Small demos get smaller users so that every split still holds a few whole users.
    per_user = min(SynthConfig.images_per_user, max(2.0, args.images / 40))
    synth = synthesize(demo_config(SynthConfig, images=args.images, seed=args.seed, images_per_user=per_user), corpus_dir)
    print(f"manifest → {synth['manifest']}\nimages   → {synth['images']}\ntruth    → {synth['truth']}")
    summary["stages"]["synth"] = {**synth, "seconds": time.perf_counter() - t0}

    t0 = _stage("split: train/val/test by user")
    manifest = assign_splits(read_manifest(synth["manifest"]), demo_config(SplitConfig, seed=args.seed))
    split_uri = storage.join(out, "manifest_split.parquet")
    write_manifest(manifest, split_uri)
    sizes = split_sizes(manifest)
    print("  ".join(f"{k}: {v['images']} images / {v['users']} users" for k, v in sizes.items()))
    print(f"manifest → {split_uri}")
    summary["stages"]["split"] = {"manifest": split_uri, "sizes": sizes, "seconds": time.perf_counter() - t0}

    t0 = _stage("stats: tag statistics (seed 001 §3)")
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    stats = tag_statistics(manifest, normalizer)
    stats_dir = storage.join(out, "stats")
    storage.makedirs(stats_dir)
    files = [write_statistics(stats, stats_dir), *plot_statistics(stats, stats_dir)]
    truth = json.loads(storage.read_text(synth["truth"]))
    truth_median = sorted(c["pi"] for c in truth["concepts"])[len(truth["concepts"]) // 2]
    lines = summary_lines(stats)
    lines.append(f"(truth.json: median tagging likelihood {truth_median:.3f})")
    print("\n".join(lines))
    print("stats → " + "\n        ".join(files))
    summary["stages"]["stats"] = {"files": files, "summary": lines, "seconds": time.perf_counter() - t0}

    t0 = _stage(f"featurize: {args.backbone} features on Ray Data (weights: {args.weights})")
    features_dir = storage.join(out, "features")
    feats = featurize(split_uri, features_dir, demo_config(FeaturizeConfig, backbone=args.backbone,
                                                                     weights=args.weights))
    print(featurize_line(feats))
    print(f"features → {features_dir}\nerrors   → {feats['errors_file']}")
    summary["stages"]["featurize"] = {
        "features": features_dir,
        "errors": feats["errors_file"],
        "featurized": feats["featurized"],
        "images_per_second": feats.get("images_per_second"),
        "seconds": time.perf_counter() - t0,
    }

    t0 = _stage("train: robust LR head on Ray Train (seed 001 §4)")
    batch = max(16, min(100, args.images // 10))  # several steps per epoch even on tiny corpora
    head_cfg = demo_config(HeadConfig, epochs=args.epochs, batch_size=batch)  # HeadConfig's default head: rlr
    model_dir = storage.join(out, "model_rlr")
    trained = train_head(split_uri, features_dir, model_dir, head_cfg, demo_config(TrainRunConfig), normalizer)
    print(f"{trained['train_images']} images × {trained['tags']} tags, {trained['steps']} steps, "
          f"final loss {trained['final_loss']:.3f}, mean π {trained['mean_pi']:.3f}\nmodel → {model_dir}")
    summary["stages"]["train"] = {"model": model_dir, "steps": trained["steps"], "mean_pi": trained["mean_pi"],
                                  "seconds": time.perf_counter() - t0}

    t0 = _stage("calibrate: per-tag intercepts on the labelled val images (seed 001 §4.4)")
    inputs = load_inputs(model_dir, split_uri, features_dir)
    calibration = demo_config(CalibrateConfig)
    info = calibrate(inputs, "val", None, l2=calibration.l2, seed=args.seed)
    inputs.head.metrics = {**inputs.head.metrics, "calibration": info, "calibrated_from": model_dir}
    calibrated_dir = storage.join(out, "model_rlr_calibrated")
    save_head(inputs.head, calibrated_dir)
    print(f"{info['tags']} label tags calibrated on {info['images']} images\nmodel → {calibrated_dir}")
    summary["stages"]["calibrate"] = {"model": calibrated_dir, **info, "seconds": time.perf_counter() - t0}

    t0 = _stage("evaluate: tag prediction, annotation, retrieval on test, with baselines")
    inputs = load_inputs(calibrated_dir, split_uri, features_dir)
    report_uri = storage.join(out, "evaluation", "report.json")
    report = run_evaluation(inputs, calibrated_dir, "test", report_uri)
    print("\n".join(evaluate_lines(report)))
    print(f"report → {report_uri}")
    summary["stages"]["evaluate"] = {"report": report_uri, "tag_prediction": report.get("tag_prediction"),
                                     "annotation": report.get("annotation"), "seconds": time.perf_counter() - t0}

    t0 = _stage("embed: word-embedding head, word vectors in the embedding shard server (seed 004)")
    vectors_uri = write_synthetic_word_vectors(synth["truth"], storage.join(corpus_dir, "word_vectors.txt"),
                                               dim=DEMO_WORD_DIM, seed=args.seed)
    embed_cfg = demo_config(EmbedConfig, epochs=args.epochs, batch_size=batch, vectors=vectors_uri)
    embed_dir = storage.join(out, "model_embed")
    embedded = train_embed(split_uri, features_dir, embed_dir, embed_cfg, demo_config(TrainRunConfig), normalizer)
    print(f"{embedded['train_images']} images, {embedded['words']} words ({embedded['pretrained_words']} pretrained, "
          f"{embedded['oov_snapping']['words']} never tagged and snapped), {embedded['steps']} steps, "
          f"final loss {embedded['final_loss']:.3f}\nmodel → {embed_dir}")
    head = load_embed_head(embed_dir)
    features_table, _ = read_features(features_dir)
    index = build_image_index(head, features_table, manifest, embed_dir)
    index_dir = storage.join(out, "index_embed")
    save_image_index(index, index_dir)
    words = WordIndex.of(head)
    labels = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("labels").to_pylist(), strict=True))
    searches = {}
    for query in demo_queries(truth, head, words):
        hits = index.search(words.query_vector(query), 5)
        searches[",".join(query)] = [{"image_id": i, "score": sc, "labels": labels.get(i)} for i, _, sc in hits]
        print(f"search {','.join(query)!r}: " + ", ".join(f"{i} {labels.get(i)}" for i, _, _ in hits))
    report_uri = storage.join(out, "evaluation_embed", "report.json")
    # with the baselines (as the RLR's report): without them its verdict cannot say whether it learned
    embed_report = run_evaluation(load_inputs(embed_dir, split_uri, features_dir), embed_dir, "test", report_uri)
    print("\n".join(evaluate_lines(embed_report)))
    print(f"index  → {index_dir}\nreport → {report_uri}")
    summary["stages"]["embed"] = {"model": embed_dir, "index": index_dir, "searches": searches,
                                  "tag_prediction": embed_report.get("tag_prediction"), "verdict": embed_report["verdict"],
                                  "seconds": time.perf_counter() - t0}

    t0 = _stage("serve: the Ray Serve app over HTTP (tagging, search, the page at /)")
    # `tagray index`'s build (Ray Data actors writing self-describing shards): the index a user
    # appends this week's photos to (`tagray index --append`) while the app serves it
    rlr_index = storage.join(out, "index_rlr")
    built = build_index(load_inputs(calibrated_dir, split_uri, features_dir).head, calibrated_dir, features_dir,
                        rlr_index, manifest=split_uri, cfg=demo_config(IndexBuildConfig))
    print(f"index: {built['images']} images in {built['shards']} shard(s), version {built['version']}")
    from tagray.commands.serve import start

    url = start({"model": calibrated_dir, "index": rlr_index}, "127.0.0.1", args.port)
    first = manifest.column("uri")[0].as_py()
    tagged = _http_json(url + "v1/tag?k=5", storage.read_bytes(first))
    query = ",".join(demo_queries(truth, inputs.head, None)[-1])
    found = _http_json(url + "v1/search?k=5&q=" + query)
    print(f"POST {url}v1/tag ({first}): " + ", ".join(f"{t['tag']} {t['p_true']:.2f}" for t in tagged["tags"]))
    print(f"GET  {url}v1/search?q={query}: " + ", ".join(i["image_id"] for i in found["images"]))
    print(f"index → {rlr_index}\nserving at {url} (page), {url}docs (API)")
    summary["stages"]["serve"] = {"url": url, "index": rlr_index, "tag": tagged, "search": found,
                                  "seconds": time.perf_counter() - t0}

    summary["seconds"] = time.perf_counter() - t_start
    summary_uri = storage.join(out, "summary.json")
    storage.write_text(summary_uri, jsonio.dumps(summary, summary_uri, indent=1, default=str))
    print(f"\n=== done in {summary['seconds']:.0f}s; summary → {summary_uri}")
    for name, stage in summary["stages"].items():
        print(f"  {name:<9} {stage['seconds']:6.1f}s")
    from ray import serve

    if args.keep_serving:
        print(f"serving at {url} — Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    else:
        print(f"(the app stops with the demo; keep it up with --keep-serving, or: tagray serve --model {calibrated_dir} "
              f"--index {rlr_index})")
    serve.shutdown()
    return 0


def _http_json(url: str, data: bytes | None = None) -> dict:
    """GET, or POST an image as multipart `file`, over real HTTP."""
    import requests

    r = requests.post(url, files={"file": ("image.jpg", data, "image/jpeg")}, timeout=60) if data is not None \
        else requests.get(url, timeout=60)
    r.raise_for_status()
    return r.json()
