"""Tag statistics of a manifest (seed 001 §3, Fig. 1, 2, 4).

- Tag histogram and the number of tags with at least k images (Fig. 1).
- With `labels` (identity mapping tag ↔ label, as seed 001 §3.4 does for NUS-WIDE):
  per label the tagging likelihood P(tag | label), P(label | tag) and the false-tag
  rate P(tag | no label); and tag accuracy by position in the raw tag list (Fig. 2).
All counts are vectorised over (image, tag) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray import jsonio
from tagray.data import storage
from tagray.data.normalize import TagNormalizer, lookup_coo

THRESHOLDS = (1, 2, 5, 10, 20, 50, 100, 1_000, 10_000, 100_000)
LAST_POSITION = 20  # positions ≥ this are pooled, as in seed 001 Fig. 2


@dataclass(frozen=True)
class StatsConfig:
    top_tags: int = 50  # tags listed in the JSON histogram
    plot_labels: int = 40  # labels shown in the likelihood plot

    def __post_init__(self) -> None:
        if self.top_tags < 1 or self.plot_labels < 1:
            from tagray.config import ConfigError

            raise ConfigError(f"need top_tags ≥ 1 and plot_labels ≥ 1, got {self.top_tags}, {self.plot_labels}")


def _pairs(rows: np.ndarray, ids: np.ndarray, width: int) -> np.ndarray:
    return np.unique(rows.astype(np.int64) * width + ids)


def tag_statistics(manifest: pa.Table, normalizer: TagNormalizer, cfg: StatsConfig | None = None) -> dict:
    """Statistics of `manifest`'s tags (normalised) and, when present, against its labels."""
    cfg = cfg or StatsConfig()
    n = manifest.num_rows
    normalized = normalizer.normalize_lists(manifest.column("tags"))
    counts = pc.value_counts(pc.list_flatten(normalized))
    tags = np.array(counts.field(0).to_pylist(), dtype=object)
    images = np.array(counts.field(1).to_pylist(), dtype=np.int64)
    order = np.lexsort((tags, -images))
    tags, images = tags[order], images[order]
    raw_lengths = pc.list_value_length(manifest.column("tags")).to_numpy(zero_copy_only=False)
    out: dict = {
        "images": n,
        "raw_tags_per_image": float(np.nan_to_num(raw_lengths, nan=0).mean()),
        "tags_per_image": float(pc.mean(pc.list_value_length(normalized)).as_py() or 0.0),
        "distinct_tags": len(tags),
        "tags_with_at_least": {str(k): int((images >= k).sum()) for k in THRESHOLDS if k <= max(n, 1)},
        "top_tags": [{"tag": t, "images": int(c)} for t, c in zip(tags[: cfg.top_tags], images[: cfg.top_tags], strict=True)],
        "histogram": {"images_per_tag": images.tolist()},
        "normalizer": normalizer.identity(),
    }
    if "labels" in manifest.column_names:
        out["labels"] = _label_statistics(manifest, normalized, normalizer)
    return out


def _label_statistics(manifest: pa.Table, normalized: pa.ListArray, normalizer: TagNormalizer) -> dict:
    n = manifest.num_rows
    labels_col = manifest.column("labels").combine_chunks()
    label_names = sorted(set(pc.list_flatten(labels_col).to_pylist()))
    # Labels are matched to tags by their normal form (identity mapping, seed 001 §3.4).
    label_keys = [normalizer.normalize_tag(name) or name for name in label_names]
    width = len(label_names)

    lab_rows, lab_ids = lookup_coo(labels_col, label_names)
    lab_pairs = _pairs(lab_rows, lab_ids, width)
    tag_rows, tag_ids = lookup_coo(normalized, label_keys)
    tag_pairs = _pairs(tag_rows, tag_ids, width)

    with_label = np.bincount(lab_pairs % width, minlength=width)
    with_tag = np.bincount(tag_pairs % width, minlength=width)
    both = np.bincount(np.intersect1d(lab_pairs, tag_pairs) % width, minlength=width)
    without_label = n - with_label
    likelihood = np.divide(both, with_label, out=np.full(width, np.nan), where=with_label > 0)
    precision = np.divide(both, with_tag, out=np.full(width, np.nan), where=with_tag > 0)
    false_rate = np.divide(with_tag - both, without_label, out=np.full(width, np.nan), where=without_label > 0)

    per_label = [
        {
            "label": label_names[i],
            "tag": label_keys[i],
            "images_with_label": int(with_label[i]),
            "images_with_tag": int(with_tag[i]),
            "tagging_likelihood": _num(likelihood[i]),  # P(tag | label)
            "precision": _num(precision[i]),  # P(label | tag)
            "false_tag_rate": _num(false_rate[i]),  # P(tag | no label)
        }
        for i in range(width)
    ]
    return {
        "per_label": per_label,
        "median_tagging_likelihood": _num(np.nanmedian(likelihood)),
        "overall_tagging_likelihood": _num(both.sum() / max(with_label.sum(), 1)),
        "overall_precision": _num(both.sum() / max(with_tag.sum(), 1)),
        "median_false_tag_rate": _num(np.nanmedian(false_rate)),
        "overall_false_tag_rate": _num((with_tag - both).sum() / max(without_label.sum(), 1)),
        "concepts_per_image": float(len(lab_pairs) / n),
        "accuracy_by_position": _accuracy_by_position(manifest, normalizer, label_keys, lab_pairs, width),
    }


def _accuracy_by_position(manifest, normalizer, label_keys, lab_pairs, width) -> list[dict]:
    """Share of label-vocabulary tags at each raw list position that are true (Fig. 2)."""
    rows, position, ids, uniques = normalizer.normalize_flat(manifest.column("tags"), cut=False)
    to_label = pc.index_in(pa.array(uniques, pa.string()), value_set=pa.array(label_keys, pa.string()))
    lab = pc.fill_null(to_label, -1).to_numpy().astype(np.int64)[ids]
    keep = lab >= 0
    rows, position, lab = rows[keep], position[keep], lab[keep]
    key = rows.astype(np.int64) * width + lab
    _, first = np.unique(key, return_index=True)  # a tag repeated in one list counts once
    correct = np.isin(key[first], lab_pairs)
    pos = np.minimum(position[first] + 1, LAST_POSITION)
    out = []
    for p in range(1, LAST_POSITION + 1):
        hit = correct[pos == p]
        if len(hit):
            acc = hit.mean()
            out.append(
                {
                    "position": f"{p}+" if p == LAST_POSITION else str(p),
                    "tags": int(len(hit)),
                    "accuracy": float(acc),
                    "stderr": float(np.sqrt(acc * (1 - acc) / len(hit))),
                }
            )
    return out


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def plot_statistics(stats: dict, out_dir: str, cfg: StatsConfig | None = None,
                    endpoint_url: str | None = None) -> list[str]:
    """PNG plots: tag histogram (Fig. 1), tagging likelihoods (Fig. 4), accuracy by position
    (Fig. 2). Returns the files written."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = cfg or StatsConfig()
    written = []

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        uri = storage.join(out_dir, name)
        storage.write_bytes(uri, buf.getvalue(), endpoint_url)
        written.append(uri)

    counts = stats["histogram"]["images_per_tag"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(np.arange(1, len(counts) + 1), counts, ".", ms=3)
    ax.set(xlabel="tag rank", ylabel="images with tag", title=f"Tag frequencies ({stats['distinct_tags']} tags)")
    ax.grid(True, which="both", alpha=0.3)
    save(fig, "tag_histogram.png")

    labels = stats.get("labels")
    if labels:
        rows = sorted(
            (r for r in labels["per_label"] if r["tagging_likelihood"] is not None),
            key=lambda r: -r["tagging_likelihood"],
        )[: cfg.plot_labels]
        fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(rows)), 4))
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["tagging_likelihood"] for r in rows], 0.4, label="P(tag | label)")
        ax.bar(x + 0.2, [r["precision"] or 0 for r in rows], 0.4, label="P(label | tag)")
        ax.set_xticks(x, [r["label"] for r in rows], rotation=90, fontsize=7)
        ax.set(ylim=(0, 1), title="Tagging likelihood and tag precision per label")
        ax.legend()
        save(fig, "tagging_likelihood.png")

        pos = labels["accuracy_by_position"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(range(len(pos)), [p["accuracy"] for p in pos], yerr=[p["stderr"] for p in pos], fmt="o-")
        ax.set_xticks(range(len(pos)), [p["position"] for p in pos], fontsize=8)
        ax.set(xlabel="position in the user's tag list", ylabel="tag accuracy", ylim=(0, 1),
               title="Tag accuracy by position")
        ax.grid(True, alpha=0.3)
        save(fig, "accuracy_by_position.png")
    return written


def write_statistics(stats: dict, out_dir: str, endpoint_url: str | None = None) -> str:
    """Writes stats.json into `out_dir`; returns its URI."""
    uri = storage.join(out_dir, "stats.json")
    storage.write_text(uri, jsonio.dumps(stats, uri, indent=1), endpoint_url)
    return uri
