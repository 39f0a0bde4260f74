"""`tagray export` throughput of a calibrated lr head over a synthetic features-only corpus:
XMP sidecars written new, then merged into the ones already there, then jsonl and csv, in the
same run (the formats are each other's baseline: XMP costs python-xmp-toolkit's calls).

    .venv/bin/python benchmarks/export.py --images 20000 --out runs/bench_export
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--out", default="runs/bench_export")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from tagray import cli
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.heads.artifact import SavedHead, save_head
    from tagray.heads.fit import HeadConfig
    from tagray.heads.linear import LinearTagger
    from tagray.train.run import training_inputs
    from tests.corpora import split_corpus

    n, root = args.images, Path(args.out) / f"c{args.images}"
    if not (root / "lr-cal").exists():
        c = split_corpus(root, n, seed=1, feature_dim=512)
        inputs = training_inputs(c["manifest"], c["features"], TagNormalizer(NormalizerConfig(lemmatize=False)),
                                 batch_size=10)
        m = LinearTagger(inputs.dim, len(inputs.vocab))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            m.linear.weight.copy_(torch.randn(m.tags, m.dim, generator=g) * 0.1)
            m.linear.bias.copy_(torch.randn(m.tags, generator=g))
        save_head(SavedHead(m, inputs.vocab, HeadConfig(head="lr"), inputs.identity, inputs.counts,
                            np.zeros(len(inputs.vocab), bool)), str(root / "lr"))
        assert cli.main(["calibrate", "--model", str(root / "lr"), "--manifest", c["manifest"], "--features",
                         c["features"], "--out", str(root / "lr-cal")]) == 0
    features, manifest = str(root / "corpus" / "features.parquet"), str(root / "manifest.parquet")
    rates = {}
    for fmt in ("xmp", "jsonl", "csv"):
        for rep in ("new", "merged") if fmt == "xmp" else ("new",):
            t = time.perf_counter()
            assert cli.main(["export", "--model", str(root / "lr-cal"), "--features", features, "--manifest", manifest,
                             "--out", str(root / f"out-{fmt}"), "--format", fmt]) == 0
            rates[f"{fmt}-{rep}"] = round(n / (time.perf_counter() - t))
    result = {"images": n, "images_per_s": rates,
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    print(json.dumps(result))
    out = ROOT / "benchmarks" / "results" / "export.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"→ {out}")


if __name__ == "__main__":
    main()
