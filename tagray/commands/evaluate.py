"""`tagray evaluate`: tag prediction, annotation and multi-tag retrieval (seed 001 §5, SPEC §6)
of a trained head on one split, with baselines, as a JSON report and plots."""

from __future__ import annotations

import argparse
import time

from tagray import jsonio
from tagray.commands.common import add_endpoint, add_model_inputs, command
from tagray.data import storage
from tagray.eval.inputs import Inputs, load_inputs
from tagray.eval.metrics import fmt
from tagray.eval.report import EvalConfig, evaluate_head, plot_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray evaluate", description=__doc__)
    add_model_inputs(p, "model directory (trained or calibrated)", "manifest with a split column (labels for annotation)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--out", required=True, help="report JSON path; plots go next to it")
    p.add_argument("--no-baselines", action="store_true", help="skip random / prior / user-tag / kNN baselines")
    add_endpoint(p)
    return p


def summary_lines(report: dict) -> list[str]:
    lines = []
    tp = report.get("tag_prediction")
    if tp:
        lines.append(f"tag prediction   P@5 {tp['precision@5']:.3f}  R@5 {tp['recall@5']:.3f}  F1@5 {tp['f1@5']:.3f}")
    an = report.get("annotation")
    if an:
        lines.append(f"annotation       P@5 {an['precision@5']:.3f}  R@5 {an['recall@5']:.3f}  F1@5 {an['f1@5']:.3f}  "
                     f"mAP_L {fmt(an['map_label'])}  mAP_I {fmt(an['map_image'])}  AUC micro {fmt(an['micro_auc'])}")
    rt = report.get("retrieval")
    if rt:
        lines.append("retrieval        " + "  ".join(f"P@5 {n}-tag {fmt(rt[f'p@5_{n}'])}" for n in (1, 2, 3) if f"p@5_{n}" in rt))
    for name, b in report.get("baselines", {}).items():
        parts = []
        if "tag_prediction" in b:
            parts.append(f"tag F1@5 {b['tag_prediction']['f1@5']:.3f}")
        if "annotation" in b:
            parts.append(f"annotation F1@5 {b['annotation']['f1@5']:.3f}")
        lines.append(f"  baseline {name:<10} " + "  ".join(parts))
    return lines


def run_evaluation(
    inputs: Inputs, model_dir: str, split: str, out: str, with_baselines: bool = True, endpoint_url: str | None = None
) -> dict:
    """Evaluates a loaded model, writes the report JSON at `out` and its plots beside it."""
    t0 = time.perf_counter()
    report, arrays = evaluate_head(inputs.head.model, inputs.targets, inputs.features, EvalConfig(), split,
                                   with_baselines=with_baselines)
    report["model"] = model_dir
    report["head"] = inputs.head.config.head
    report["calibrated"] = bool(inputs.head.calibrated.any())
    report["seconds"] = time.perf_counter() - t0
    out_dir = out.rsplit("/", 1)[0] if "/" in out else "."
    storage.makedirs(out_dir, endpoint_url)
    if not storage.is_remote(out):
        report["plots"] = plot_report(arrays, list(inputs.head.vocab.tags), out_dir)
    storage.write_text(out, jsonio.dumps(report, out, indent=1), endpoint_url)
    return report


@command("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tagray.heads.artifact import head_kind

    if head_kind(args.model, args.endpoint_url) == "neighbors":  # needs the manifest's metadata, not only features
        from tagray.eval.neighbors_report import summary_lines as neighbor_lines
        from tagray.train.neighbors_run import evaluate_saved

        report = evaluate_saved(args.model, args.manifest, args.features, args.split, not args.no_baselines,
                                args.endpoint_url)
        storage.makedirs(args.out.rsplit("/", 1)[0] if "/" in args.out else ".", args.endpoint_url)
        storage.write_text(args.out, jsonio.dumps(report, args.out, indent=1), args.endpoint_url)
        print("\n".join(neighbor_lines(report)))
        print(f"report → {args.out}")
        return 0
    inputs = load_inputs(args.model, args.manifest, args.features, args.endpoint_url)
    report = run_evaluation(inputs, args.model, args.split, args.out, not args.no_baselines, args.endpoint_url)
    print("\n".join(summary_lines(report)))
    print(f"report → {args.out}")
    return 0
