"""`tagray synth`: generate a synthetic tagged-photo corpus (images or features)."""

from __future__ import annotations

import argparse

from tagray import jsonio
from tagray.commands.common import add_endpoint, add_overrides, command
from tagray.config import load_config, parse_overrides
from tagray.data.synth import SynthConfig, synthesize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray synth", description=__doc__)
    p.add_argument("--out", required=True, help="output directory or s3:// prefix")
    p.add_argument("--config", default=None, help="YAML of SynthConfig fields (e.g. configs/synth.yaml)")
    p.add_argument("--images", type=int, default=None, help="number of images")
    p.add_argument("--concepts", type=int, default=None, help="number of visual concepts T")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--features-only", action="store_true", help="write features.parquet instead of JPEGs")
    p.add_argument("--word-vectors", type=int, default=None, metavar="DIM",
                   help="also write word_vectors.txt: synthetic pretrained vectors of this dimension (GloVe text format)")
    p.add_argument("--ray-address", default=None, help="Ray cluster for rendering (default: RAY_ADDRESS or local)")
    add_endpoint(p)
    add_overrides(p, "SynthConfig")
    return p


@command("synth")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    for key in ("images", "concepts", "seed"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    cfg = load_config(SynthConfig, args.config, overrides)
    if not args.features_only:
        from tagray.runtime import init_ray

        init_ray(args.ray_address)
    result = synthesize(cfg, args.out, features_only=args.features_only, endpoint_url=args.endpoint_url)
    if args.word_vectors:
        from tagray.data import storage
        from tagray.data.word_vectors import write_synthetic_word_vectors

        result["word_vectors"] = write_synthetic_word_vectors(
            result["truth"], storage.join(args.out, "word_vectors.txt"), args.word_vectors, cfg.seed, args.endpoint_url)
    print(jsonio.dumps(result, "synth summary", indent=1))
    return 0
