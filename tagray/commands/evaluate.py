"""`tagray evaluate`: tag prediction, annotation and multi-tag retrieval (seed 001 §5, SPEC §6)
of a trained head on one split, with baselines and a verdict in words, as a JSON report (the one
shape of every head: tagray/eval/shape.py) and plots."""

from __future__ import annotations

import argparse
import time

from tagray import jsonio
from tagray.commands.common import add_endpoint, add_model_inputs, command
from tagray.data import storage
from tagray.eval.inputs import Inputs, load_inputs
from tagray.eval.report import EvalConfig, evaluate_head, plot_report
from tagray.eval.shape import summary_lines

__all__ = ["build_parser", "main", "run_evaluation", "summary_lines"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray evaluate", description=__doc__)
    add_model_inputs(p, "model directory (trained or calibrated)", "manifest with a split column (labels for annotation)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--out", required=True, help="report JSON path; plots go next to it")
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines (random, prior, user tags, kNN, "
                   "and the head's own: visual-only, neighbourhood voting, ϕ0)")
    add_endpoint(p)
    return p


def _write(report: dict, out: str, endpoint_url: str | None) -> str:
    out_dir = out.rsplit("/", 1)[0] if "/" in out else "."
    storage.makedirs(out_dir, endpoint_url)
    storage.write_text(out, jsonio.dumps(report, out, indent=1), endpoint_url)
    return out_dir


def run_evaluation(
    inputs: Inputs, model_dir: str, split: str, out: str, with_baselines: bool = True, endpoint_url: str | None = None
) -> dict:
    """Evaluates a loaded head that tags from features (lr, rlr, embed, refine without ϕ0's
    tables), writes the report JSON at `out` and its plots beside it."""
    t0 = time.perf_counter()
    report, arrays = evaluate_head(inputs.head.model, inputs.targets, inputs.features, EvalConfig(), split,
                                   with_baselines=with_baselines, head=inputs.head.config.head)
    report["model_dir"] = model_dir
    report["calibrated"] = bool(inputs.head.calibrated.any())
    report["seconds"] = time.perf_counter() - t0
    out_dir = out.rsplit("/", 1)[0] if "/" in out else "."
    storage.makedirs(out_dir, endpoint_url)
    if not storage.is_remote(out):
        report["plots"] = plot_report(arrays, list(inputs.head.vocab.tags), out_dir)
    _write(report, out, endpoint_url)
    return report


@command("evaluate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tagray.heads.artifact import head_kind

    kind = head_kind(args.model, args.endpoint_url)
    if kind in ("neighbors", "refine"):  # need the manifest's splits as arrays (metadata neighbours, train images)
        t0 = time.perf_counter()
        if kind == "neighbors":
            from tagray.eval.neighbors_report import evaluate_saved_neighbors as evaluate_saved
        else:
            from tagray.eval.refine_report import evaluate_saved_refine as evaluate_saved
        report = evaluate_saved(args.model, args.manifest, args.features, args.split, not args.no_baselines,
                                args.endpoint_url)
        report["calibrated"] = False
        report["seconds"] = time.perf_counter() - t0
        _write(report, args.out, args.endpoint_url)
    else:
        inputs = load_inputs(args.model, args.manifest, args.features, args.endpoint_url)
        report = run_evaluation(inputs, args.model, args.split, args.out, not args.no_baselines, args.endpoint_url)
    print("\n".join(summary_lines(report)))
    print(f"report → {args.out}")
    return 0
