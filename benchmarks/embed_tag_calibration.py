"""Per-tag calibration of the embed head's user-tag scores on the validation split (issue 14's
embed F1@5 case). The shipped defaults are trained in process as benchmarks/defaults_learn.py
trains them; the user-tag scores s = h(x)·v_t then get
(a) nothing: σ(s + log q(t)) of the negative sampler (before per-tag calibration was built),
(b) per-tag offsets β_t (tagray.heads.calibrate.fit_intercepts, the RLR calibration's Newton steps),
(c) per-tag Platt scaling σ(a_t s + b_t), a_t ≥ 0 (calibrate_user_tags: what `tagray train` does),
each scored on the test split: tag-prediction F1@5 and annotation mAP_L, beside kNN's.

    .venv/bin/python benchmarks/embed_tag_calibration.py [--images 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import defaults_learn  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--out", default="benchmarks/results/embed_tag_calibration.json")
    args = p.parse_args()
    from tagray.eval.report import EvalConfig, evaluate_head
    from tagray.heads.calibrate import fit_intercepts
    from tagray.heads.embedding import EmbedTagger
    from tagray.heads.targets import multi_hot

    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        c = defaults_learn.corpus(args.images, Path(workdir))
        data = c["data"]
        val = data.parts["val"]
        cfg, recipe, table, counts, _ = defaults_learn.train_embed(c, False, {})

        def score(tagger: EmbedTagger) -> dict:
            report, _ = evaluate_head(tagger, c["targets"], c["features"], EvalConfig(), "test", with_baselines=True)
            return {"f1@5": report["tag_prediction"]["f1@5"], "map_label": report["annotation"]["map_label"],
                    "knn_f1@5": report["baselines"]["knn"]["tag_prediction"]["f1@5"],
                    "prior_f1@5": report["baselines"]["prior"]["tag_prediction"]["f1@5"],
                    "knn_map_label": report["baselines"]["knn"]["annotation"]["map_label"]}

        plain = defaults_learn.embed_tagger(c, cfg, recipe, table, counts, calibrate=False)
        rows["σ(s + log q(t)) of the sampler (before)"] = score(plain)
        tagged = (val.tag_ids >= 0).any(1)
        with torch.no_grad():
            s = plain(torch.from_numpy(val.x[tagged]).float())
        beta = fit_intercepts(s, multi_hot(val.tag_ids[tagged], data.tags), l2=1.0).float()
        rows["offsets β_t on val"] = score(EmbedTagger(recipe.mlp.eval(), plain.tag_vectors, beta))
        t0 = time.perf_counter()
        shipped = defaults_learn.embed_tagger(c, cfg, recipe, table, counts)
        seconds = time.perf_counter() - t0
        rows["Platt σ(a_t s + b_t), a_t ≥ 0, on val (shipped)"] = {
            **score(shipped), "tags_with_scale_0": int((shipped.tag_scale == 0).sum()), "tags": data.tags,
            "val_images": int(tagged.sum()), "fit_seconds": round(seconds, 3)}
    for name, row in rows.items():
        print(json.dumps({"case": name, **{k: round(v, 4) for k, v in row.items()}}, ensure_ascii=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"images": args.images, "rows": rows}, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
