"""`tagray calibrate`: W frozen, one intercept β per tag fitted on clean labels (seed 001 §4.4,
eq. 13) — the labelled images of a manifest split, or users' verdicts on suggested tags
(`--feedback STORE`); on an embed model, per-tag Platt scaling of its user-tag scores refitted on
a split's tagged images (what `tagray train --head embed` fits on val). Writes a new model
directory."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pyarrow as pa
import torch

from tagray import jsonio
from tagray.commands.common import add_endpoint, command
from tagray.config import ConfigError, from_dict
from tagray.data import schema, storage
from tagray.data.feedback import FeedbackError, FeedbackStore, sqlite_path
from tagray.data.normalize import TagNormalizer
from tagray.data.schema import SchemaError
from tagray.eval.inputs import load_inputs
from tagray.features import store
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.calibrate import CalibrateConfig, FeedbackFit, fit_intercepts, recalibrate
from tagray.heads.embed_artifact import SavedEmbedHead, save_embed_head
from tagray.heads.embedding import EmbedConfig
from tagray.heads.fit import align
from tagray.heads.models import load_model
from tagray.heads.targets import build_targets, dense, label_vocabulary
from tagray.heads.user_tags import fit_on_split

CALIBRATION_FILE = "calibration.json"  # feedback: per tag the verdicts used, β before and after, tags left as they were


def build_parser() -> argparse.ArgumentParser:
    defaults = CalibrateConfig  # its field defaults, shown in the help
    p = argparse.ArgumentParser(prog="tagray calibrate", description=__doc__)
    p.add_argument("--model", required=True, help="trained model directory (lr, rlr, calibrated or not; embed)")
    p.add_argument("--manifest", default=None, help="manifest with labels and a split column (not with --feedback)")
    p.add_argument("--features", required=True, help="features of the images the labels or verdicts are about")
    p.add_argument("--out", required=True, help="the calibrated model directory")
    p.add_argument("--feedback", default=None, metavar="STORE",
                   help="refit β from users' verdicts in this store (sqlite:///path.db) instead of a labelled split")
    p.add_argument("--policy", default=None, help=f"--feedback: which verdicts count, latest | majority (default {defaults.policy})")
    p.add_argument("--min-present", type=int, default=None, help=f"--feedback: present verdicts a tag needs (default {defaults.min_present})")
    p.add_argument("--min-absent", type=int, default=None, help=f"--feedback: absent verdicts a tag needs (default {defaults.min_absent})")
    p.add_argument("--prior", type=float, default=None,
                   help=f"--feedback: weight of the prior β ~ N(current β, 1/prior) (default {defaults.prior:g})")
    p.add_argument("--split", default="val", help="split whose labelled (embed: tagged) images calibrate (default val)")
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most N labelled images (seeded sample; embed: default EmbedConfig.calibration_images)")
    p.add_argument("--l2", type=float, default=None, help=f"labelled split: weight of the prior β ~ N(0, 1/l2) (default {defaults.l2:g})")
    p.add_argument("--seed", type=int, default=0)
    add_endpoint(p)
    return p


def settings(args: argparse.Namespace) -> CalibrateConfig:
    """CalibrateConfig from the flags given (the dataclass holds the defaults)."""
    given = {"policy": args.policy, "min_present": args.min_present, "min_absent": args.min_absent,
             "prior": args.prior, "l2": args.l2}
    return from_dict(CalibrateConfig, {k: v for k, v in given.items() if v is not None}, "tagray calibrate flags")


def calibrate(inputs, split: str, max_images: int | None, l2: float, seed: int) -> dict:
    """Fits β in place on `inputs.head` from the labelled images of `split`; returns what was done."""
    targets = inputs.targets
    head = inputs.head
    if not isinstance(head, SavedHead):
        raise SchemaError(f"calibration fits the intercepts β of a linear head (lr, rlr), or an embed head's user-tag "
                          f"scaling; this model is a {head.config.head!r} head")
    part = targets.filter(pa.compute.and_(pa.compute.equal(targets.column("split"), split), targets.column("labelled")))
    if part.num_rows == 0:
        raise SchemaError(f"split '{split}' has no labelled images: calibration needs a 'labels' column with values")
    if max_images is not None:
        if max_images < 1:
            raise ConfigError(f"--max-images must be ≥ 1, got {max_images}")
        take = np.sort(np.random.default_rng(seed).permutation(part.num_rows)[:max_images])
        part = part.take(pa.array(take))
    x, found = align(inputs.features, part.column("image_id"))
    if len(found) == 0:
        raise SchemaError(f"none of the {part.num_rows} labelled images of split '{split}' has features")
    cols = label_vocabulary(targets, head.model.tags)
    z = dense(part.column("label_ids").take(pa.array(found)), head.model.tags)[:, cols]
    with torch.inference_mode():
        scores = head.model(x)[:, cols]
    beta = fit_intercepts(scores, z, l2=l2)
    head.model.beta.zero_()
    head.model.beta[torch.from_numpy(cols)] = beta
    head.calibrated = np.zeros(head.model.tags, bool)
    head.calibrated[cols] = True
    return {"split": split, "images": len(found), "tags": len(cols), "l2": l2,
            "mean_beta": float(beta.mean()) if len(cols) else 0.0}


def read_verdicts(url: str, policy: str) -> pa.Table:
    """The store's resolved verdicts; FileNotFoundError for a store that does not exist (opening
    one would create it empty), ConfigError for a URL tagray cannot read."""
    try:
        path = sqlite_path(url)
    except FeedbackError as e:
        raise ConfigError(f"--feedback: {e}") from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--feedback {url}: no feedback store at {path}")
    db = FeedbackStore(path)
    try:
        return db.resolved(policy)
    finally:
        db.close()


def calibrate_from_feedback(head: SavedHead, features: pa.Table, features_uri: str, url: str,
                            cfg: CalibrateConfig) -> FeedbackFit:
    """Refits β on `head` in place from the store's verdicts (heads.calibrate.recalibrate);
    SchemaError when no verdict is on an image of `features_uri` with a tag of the model."""
    verdicts = read_verdicts(url, cfg.policy)
    if verdicts.num_rows == 0:
        raise SchemaError(f"--feedback {url}: no decided verdicts under policy {cfg.policy!r}: nothing to calibrate on")
    fit = recalibrate(head.model, list(head.vocab.tags), features, verdicts, cfg)
    if fit.used == 0:
        s = fit.skipped
        raise SchemaError(f"--feedback {url}: none of the {fit.verdicts} verdicts matches the model and {features_uri}: "
                          f"{s['upload']} on uploads (sha256:…, no features), {s['no_features']} on images without "
                          f"features there, {s['unknown_tag']} on tags outside the model's vocabulary")
    with torch.no_grad():
        head.model.beta.copy_(fit.beta)
    head.calibrated = np.asarray(head.calibrated, bool) | fit.refitted
    return fit


def main_feedback(args: argparse.Namespace, cfg: CalibrateConfig) -> int:
    t0 = time.perf_counter()
    if args.manifest is not None:
        raise ConfigError("--feedback takes its labels from the store: drop --manifest (or drop --feedback to "
                          "calibrate on the manifest's labelled split)")
    head = load_model(args.model, args.endpoint_url)
    if not isinstance(head, SavedHead):
        raise SchemaError(f"--feedback refits the intercepts β of a linear head (lr, rlr); this model is a "
                          f"{head.config.head!r} head" + (" (its user-tag scaling is fitted on a split: --manifest, no "
                                                         "--feedback)" if isinstance(head, SavedEmbedHead) else ""))
    features, identity = store.read_features(args.features, args.endpoint_url)
    store.require_same(identity, head.backbone, args.features, args.model)
    schema.validate_features(features.schema, args.features)
    fit = calibrate_from_feedback(head, features, args.features, args.feedback, cfg)
    refitted = int(fit.refitted.sum())
    info = {"source": "feedback", "store": args.feedback, "policy": cfg.policy, "verdicts": fit.verdicts,
            "used": fit.used, "skipped": fit.skipped, "tags_with_verdicts": len(fit.tags), "tags_refitted": refitted,
            "tags_left": len(fit.tags) - refitted, "min_present": cfg.min_present, "min_absent": cfg.min_absent,
            "prior": cfg.prior, "seconds": time.perf_counter() - t0}
    head.metrics = {**head.metrics, "calibration": info, "calibrated_from": args.model}
    save_head(head, args.out, args.endpoint_url)
    storage.write_text(storage.join(args.out, CALIBRATION_FILE),
                       jsonio.dumps({**info, "tags": fit.tags}, CALIBRATION_FILE, indent=1), args.endpoint_url)
    s = fit.skipped
    print(f"refitted β of {refitted} of {len(fit.tags)} tags from {fit.used} of {fit.verdicts} verdicts "
          f"({cfg.policy}); {len(fit.tags) - refitted} left as they were (fewer than {cfg.min_present} present or "
          f"{cfg.min_absent} absent verdicts)")
    if any(s.values()):
        print(f"skipped {s['upload']} verdicts on uploads (sha256:…, no features in {args.features}), "
              f"{s['no_features']} on other images without features, {s['unknown_tag']} on unknown tags")
    print(f"model → {args.out} (per tag: {storage.join(args.out, CALIBRATION_FILE)})")
    return 0


def main_embed(args: argparse.Namespace, head: SavedEmbedHead, t0: float) -> int:
    """An embed model: its user-tag Platt scaling refitted on the tagged images of `--split`
    (`user_tags.fit_on_split`), written with the rest of the model unchanged to `--out`."""
    limit = EmbedConfig.calibration_images if args.max_images is None else args.max_images
    if limit < 1:
        raise ConfigError(f"--max-images must be ≥ 1, got {limit}")
    identity = store.features_identity(args.features, args.endpoint_url)
    if identity is None:  # no feature files at all (a file without an identity is refused by features_identity)
        raise FileNotFoundError(store.missing_message(args.features))
    store.require_same(identity, head.backbone, args.features, args.model)
    normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
    manifest = schema.read_manifest(args.manifest, need=("split",), endpoint_url=args.endpoint_url)
    targets = build_targets(manifest, normalizer, head.vocab)
    tags = len(head.vocab)
    fitted, fit = fit_on_split(head.mlp, head.vectors[:tags], targets, args.features, args.split, limit, args.seed,
                               normalizer.cfg.max_tags, args.endpoint_url)
    if fitted is None:
        raise SchemaError(f"split '{args.split}' of {args.manifest} has no images with a vocabulary tag and features in "
                          f"{args.features}: nothing to calibrate the user-tag scores on")
    head.user_tags, head.user_tags_fit = fitted, fit
    head.metrics = {**head.metrics, "user_tags": fit, "calibrated_from": args.model,
                    "seconds_calibrating": time.perf_counter() - t0}
    save_embed_head(head, args.out, args.endpoint_url)
    print(f"user-tag calibration: per-tag Platt scaling on {fit['images']} tagged '{args.split}' images "
          f"({fit['tags_with_scale_0']} of {tags} tags get scale 0: their base rate)")
    print(f"model → {args.out}")
    return 0


@command("calibrate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = settings(args)
    if args.feedback is not None:
        return main_feedback(args, cfg)
    if args.manifest is None:
        raise ConfigError("--manifest is required (the labelled split to calibrate on), unless --feedback STORE")
    t0 = time.perf_counter()
    head = load_model(args.model, args.endpoint_url)
    if isinstance(head, SavedEmbedHead):
        return main_embed(args, head, t0)
    inputs = load_inputs(args.model, args.manifest, args.features, args.endpoint_url, head=head)
    info = calibrate(inputs, args.split, args.max_images, cfg.l2, args.seed)
    info["seconds"] = time.perf_counter() - t0
    inputs.head.metrics = {**inputs.head.metrics, "calibration": info, "calibrated_from": args.model}
    save_head(inputs.head, args.out, args.endpoint_url)
    print(f"calibrated {info['tags']} tags on {info['images']} labelled '{args.split}' images "
          f"(mean β {info['mean_beta']:+.2f}) in {info['seconds']:.1f}s")
    print(f"model → {args.out}")
    return 0
