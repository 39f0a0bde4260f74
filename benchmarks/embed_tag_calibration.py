"""Per-tag calibration of the embed head's user-tag scores on the validation split: an experiment
for issue 14's open embed-3k F1@5 case, not wired into tagray. The shipped defaults are trained in
process as benchmarks/defaults_learn.py trains them; then the user-tag scores s = h(x)·v_t get
(a) per-tag offsets β_t (tagray.heads.calibrate.fit_intercepts, the RLR calibration's Newton
steps), or (b) per-tag Platt scaling a_t·s + b_t (Adam on the validation BCE, a_t pulled towards 1);
each is scored on the test split: tag-prediction F1@5 and annotation mAP_L, beside kNN's.

    .venv/bin/python benchmarks/embed_tag_calibration.py [--images 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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
    from tagray.heads.embedding import EmbedTagger, tag_log_prior
    from tagray.heads.targets import multi_hot

    torch.set_num_threads(1)
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        c = defaults_learn.corpus(args.images, Path(workdir))
        data = c["data"]
        val = data.parts["val"]
        cfg, recipe, table, counts, _ = defaults_learn.train_embed(c, False, {})
        vectors = table.vectors[: data.tags].clone()

        def score(tagger: EmbedTagger) -> dict:
            report, _ = evaluate_head(tagger, c["targets"], c["features"], EvalConfig(), "test", with_baselines=True)
            return {"f1@5": report["tag_prediction"]["f1@5"], "map_label": report["annotation"]["map_label"],
                    "knn_f1@5": report["baselines"]["knn"]["tag_prediction"]["f1@5"],
                    "knn_map_label": report["baselines"]["knn"]["annotation"]["map_label"]}

        tagger = EmbedTagger(recipe.mlp.eval(), vectors, tag_log_prior(cfg, counts))
        rows["defaults (log q(t) of the sampler)"] = score(tagger)
        with torch.no_grad():
            s = tagger(torch.from_numpy(val.x).float())
        z = multi_hot(val.tag_ids, data.tags)
        for l2 in (1.0, 10.0):
            beta = fit_intercepts(s, z, l2=l2).float()
            rows[f"offsets β_t on val (l2 {l2:g})"] = score(EmbedTagger(recipe.mlp.eval(), vectors, beta))
        a = torch.ones(data.tags, requires_grad=True)
        b = torch.zeros(data.tags, requires_grad=True)
        opt = torch.optim.Adam([a, b], lr=0.05)
        for _ in range(500):
            opt.zero_grad()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(s * a + b, z, reduction="sum")
            (bce + 0.5 * ((a - 1) ** 2).sum() + 0.005 * (b**2).sum()).backward()
            opt.step()
        scaled = EmbedTagger(recipe.mlp.eval(), vectors * a.detach()[:, None], b.detach())
        rows["Platt a_t·s + b_t on val"] = {**score(scaled), "negative_scales": int((a < 0).sum())}
    for name, row in rows.items():
        print(json.dumps({"case": name, **{k: round(v, 4) for k, v in row.items()}}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"images": args.images, "rows": rows}, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
