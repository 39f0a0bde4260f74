"""`tagray export`: every featurized image's tags for photo libraries and other tools — the
user's own tags (the manifest's `tags`, as typed) kept apart from the predicted ones, the
tags whose P(z=1|x) is above `--min-p` (seed 001 eq. 3; with the intercepts β of `tagray
calibrate`, eq. 13, and then only the calibrated tags: SPEC §3.1, §8 "Out").

- `--format xmp`: one sidecar per image (tagray/data/xmp.py: dc:subject, lr:hierarchicalSubject,
  the tagray namespace), merged into a sidecar already there. Named `<image file name>.xmp`
  (`--sidecar-name ext`, the default: IMG_1234.jpg.xmp, what darktable and digiKam write; never
  ambiguous between IMG_1234.jpg and IMG_1234.cr2) or `<name without extension>.xmp`
  (`--sidecar-name base`: IMG_1234.xmp, what Lightroom, Capture One and Bridge write); Immich
  reads both. Flat in DIR, or mirroring the library's folders under `--images-root` (with
  DIR = that root, beside the images). Two images on one sidecar name are refused up front.
- `--format jsonl|csv`: one file, DIR/tags.jsonl (a line per image) or DIR/tags.csv (a row
  per image and tag: image_id, uri, source user|predicted, tag, model_tag, p).

DIR/export_summary.json says what was written. Memory: the manifest's image_id, uri and tags
columns, one int per feature row, and one batch of features (`--batch-size`).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import posixpath
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from tagray import jsonio
from tagray.commands.common import add_endpoint, command
from tagray.config import ConfigError
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer
from tagray.data.xmp import ImageTags, ModelStamp, SidecarError, merge_sidecar
from tagray.features import store
from tagray.heads.artifact import state_digest
from tagray.heads.embed_artifact import SavedEmbedHead
from tagray.heads.models import load_image_tagger
from tagray.jsonio import NonFiniteError

log = logging.getLogger(__name__)

FORMATS = ("xmp", "jsonl", "csv")
TABLE_FILES = {"jsonl": "tags.jsonl", "csv": "tags.csv"}
CSV_COLUMNS = ("image_id", "uri", "source", "tag", "model_tag", "p")
SUMMARY_FILE = "export_summary.json"
EXAMPLES = 5  # sidecars skipped, named in the summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (lr/rlr, calibrated or not, or refine)")
    p.add_argument("--features", required=True, help="features of the images (of the model's backbone)")
    p.add_argument("--manifest", required=True, help="manifest: each image's uri and user tags")
    p.add_argument("--out", required=True, help="output directory (local or s3://)")
    p.add_argument("--format", choices=FORMATS, default="xmp", help="xmp sidecars (default), or one jsonl / csv file")
    p.add_argument("--min-p", type=float, default=0.5, help="predicted tags have P(z=1|x) above this, in (0, 1] (default 0.5)")
    p.add_argument("--sidecar-name", choices=("ext", "base"), default="ext",
                   help="ext: IMG_1234.jpg.xmp (default; darktable, digiKam); base: IMG_1234.xmp (Lightroom)")
    p.add_argument("--images-root", default=None,
                   help="keep each image's folders under this root in DIR (every uri must start with it); "
                        "default: sidecars flat in DIR")
    p.add_argument("--batch-size", type=int, default=16_384, help="feature rows scored at once (default 16384)")
    p.add_argument("--workers", type=int, default=8, help="threads reading and writing sidecars (default 8)")
    add_endpoint(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Settings checked before anything is read (STYLE 5)."""
    if not (math.isfinite(args.min_p) and 0 < args.min_p <= 1):
        raise ConfigError(f"--min-p must be in (0, 1], got {args.min_p}: a tag is exported when its P(z=1|x) is above it")
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if value < 1:
            raise ConfigError(f"{flag} must be ≥ 1, got {value}")
    if args.format != "xmp" and (args.images_root or args.sidecar_name != "ext"):
        raise ConfigError(f"--images-root and --sidecar-name name XMP sidecars; --format {args.format} writes one file")


# --- the model ---------------------------------------------------------------------------------

def load_tagger(model_dir: str, endpoint_url: str | None):
    """An image-only head with a P(z=1|x): lr, rlr or refine (the embed head's f·v is no probability)."""
    head = load_image_tagger(model_dir, endpoint_url)
    if isinstance(head, SavedEmbedHead):
        raise schema.SchemaError(
            f"{model_dir}: an embed head scores words by f·v, which is no calibrated probability P(z=1|x); "
            "export an lr or rlr model (calibrated with `tagray calibrate`); `tagray search` gives an embed "
            "head's words for an image")
    return head


def candidate_tags(head) -> np.ndarray:
    """The tag columns whose P(z) is exported: the calibrated tags of a calibrated model (only
    their P(z) is a probability), else every tag (as TaggingService answers)."""
    calibrated = np.nonzero(np.asarray(head.calibrated, bool))[0]
    return calibrated if len(calibrated) else np.arange(len(head.vocab.tags))


def content_probabilities(head, x: torch.Tensor) -> np.ndarray:
    """P(z=1|x) (B, T) of features x (B, D): the head's own `probabilities` (β included)."""
    with torch.inference_mode():
        _, log_true = head.model.probabilities(x)
    return np.exp(log_true.numpy().astype(np.float64))


def model_stamp(head, model_dir: str, min_p: float) -> ModelStamp:
    return ModelStamp(
        name=posixpath.basename(model_dir.split("?", 1)[0].rstrip("/")) or model_dir,
        head=head.config.head,
        vocabulary_version=head.vocab.version,
        weights_digest=state_digest(head.model),  # what `tagray index` records as weights_digest
        calibrated=bool(np.asarray(head.calibrated, bool).any()),
        threshold=min_p,
    )


# --- the inputs --------------------------------------------------------------------------------

def read_inputs(args: argparse.Namespace, head) -> tuple[pa.Table, list[str], np.ndarray]:
    """(manifest's image_id, uri, tags; the feature files; the manifest row of each feature row
    in file order, −1 where the manifest has none). Only image ids are read from the features."""
    files = store.feature_files(args.features, args.endpoint_url)
    if not files:
        raise FileNotFoundError(store.missing_message(args.features))
    identity = store.features_identity(args.features, args.endpoint_url)
    store.require_same(identity, head.backbone, args.features, args.model)
    manifest = read_manifest_columns(args.manifest, args.endpoint_url)
    ids = store.featurized_ids(args.features, args.endpoint_url)
    if pc.count_distinct(ids).as_py() != len(ids):
        dup = pc.filter(pc.value_counts(ids).field(0), pc.greater(pc.value_counts(ids).field(1), 1))[0]
        raise schema.SchemaError(f"{args.features}: image_id {dup.as_py()!r} has more than one feature row")
    rows = pc.fill_null(pc.index_in(ids, value_set=manifest.column("image_id")), -1).to_numpy().astype(np.int64)
    return manifest, files, rows


def read_manifest_columns(uri: str, endpoint_url: str | None) -> pa.Table:
    """The manifest's image_id, user_id, uri and tags (its other columns are not read), validated."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    try:
        found = pq.ParquetDataset(path, filesystem=fs).schema
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{storage.redact(uri)}: no such Parquet file or directory") from e
    except pa.ArrowInvalid as e:
        raise schema.SchemaError(f"{storage.redact(uri)}: cannot be read as Parquet: {e}") from e
    schema.validate_manifest(found, uri)
    table = schema.read_table(uri, columns=list(schema.MANIFEST_REQUIRED), endpoint_url=endpoint_url)
    schema.validate_manifest(table, uri)
    return table


def feature_batches(files: list[str], batch_size: int, endpoint_url: str | None) -> Iterator[tuple[str, pa.Array, np.ndarray]]:
    """(file, image ids, features (B, D) float32) of every feature file in turn, `batch_size`
    rows at a time (the order of `store.featurized_ids`)."""
    for f in files:
        fs, path = storage.filesystem_for(f, endpoint_url)
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size, columns=["image_id", "feature"]):
                col = batch.column("feature")
                if col.null_count:
                    raise schema.SchemaError(f"{f}: column 'feature' has {col.null_count} null row(s)")
                x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
                bad = np.nonzero(~np.isfinite(x).all(1))[0]
                if len(bad):
                    raise NonFiniteError(f"{f}: the features of image {batch.column('image_id')[int(bad[0])].as_py()!r} "
                                         f"hold NaN or ±inf ({len(bad)} such row(s) in this batch); re-featurize them")
                yield f, batch.column("image_id"), np.ascontiguousarray(x, np.float32)


def sidecar_paths(manifest: pa.Table, rows: np.ndarray, naming: str, images_root: str | None) -> pa.Array:
    """The path under DIR of each exported image's sidecar (rows: manifest rows, ≥ 0), from its
    uri (or image_id without one): ConfigError when two images would share one, compared
    case-insensitively (macOS and Windows file systems are)."""
    take = pa.array(rows)
    ids = manifest.column("image_id").take(take)
    source = pc.replace_substring_regex(pc.coalesce(manifest.column("uri").take(take), ids), r"[?#].*$", "")
    if images_root:
        root = images_root.rstrip("/") + "/"
        outside = pc.invert(pc.starts_with(source, root))
        if pc.any(outside).as_py():
            i = pc.index(outside, True).as_py()
            raise ConfigError(f"--images-root {images_root}: image {ids[i].as_py()!r} ({source[i].as_py()}) is not under it")
        rel = pc.utf8_slice_codeunits(source, len(root))
    else:
        rel = pc.replace_substring_regex(source, r"^.*/", "")
    if naming == "base":
        rel = pc.replace_substring_regex(rel, r"\.[^./]*$", "")
    bad = pc.or_(pc.equal(rel, ""), pc.match_substring_regex(rel, r"(^|/)\.\.?(/|$)"))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise ConfigError(f"image {ids[i].as_py()!r}: cannot name a sidecar after {source[i].as_py()!r}")
    rel = pc.binary_join_element_wise(rel, pa.scalar(".xmp"), "")
    counts = pc.value_counts(pc.utf8_lower(rel))
    shared = pc.filter(counts.field(0), pc.greater(counts.field(1), 1))
    if len(shared):
        same = pc.filter(ids, pc.equal(pc.utf8_lower(rel), shared[0])).to_pylist()[:2]
        hint = "give --images-root to keep their folders" + ("" if naming == "ext" else ", or --sidecar-name ext")
        raise ConfigError(f"images {same[0]!r} and {same[1]!r} would share the sidecar {shared[0].as_py()!r} "
                          f"(--sidecar-name {naming}); {hint}")
    return rel


# --- one batch's tags ----------------------------------------------------------------------------

@dataclass
class Tagged:
    image_id: str
    uri: str | None
    tags: ImageTags
    sidecar: str | None  # path under DIR (xmp only)


def user_tags(raw: list[str] | None, normalizer: TagNormalizer, vocab_index: dict[str, int]) -> tuple[list[str], list[str | None]]:
    """The user's tags as typed (empty and repeated ones dropped) and the model tag each one
    normalises to (None when it is dropped or not in the vocabulary)."""
    typed = [t for t in dict.fromkeys(raw or ()) if t and t.strip()]
    normal = [normalizer.normalize_tag(t) for t in typed]
    return typed, [t if t in vocab_index else None for t in normal]


def predicted_tags(p: np.ndarray, candidates: np.ndarray, tags: tuple[str, ...], min_p: float) -> list[list[tuple[str, float]]]:
    """Per row of P(z=1|x) (B, T): (tag, P) of the candidate tags with P > min_p, best first."""
    pc_ = p[:, candidates]
    out = []
    for row in pc_:
        keep = np.nonzero(row > min_p)[0]
        keep = keep[np.argsort(-row[keep], kind="stable")]
        out.append([(tags[candidates[j]], float(row[j])) for j in keep])
    return out


# --- writers -------------------------------------------------------------------------------------

class SidecarWriter:
    """One sidecar per image, merged into the one there (read and written by `workers` threads;
    local files replaced atomically by a rename, objects by one PUT)."""

    def __init__(self, out: str, stamp: ModelStamp, workers: int, endpoint_url: str | None) -> None:
        self.out, self.stamp, self.endpoint_url = out, stamp, endpoint_url
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="export")
        self.counts = Counter()
        self.examples: list[str] = []
        storage.makedirs(out, endpoint_url)

    def _read(self, uri: str) -> bytes | None:
        try:
            return storage.read_bytes(uri, self.endpoint_url)
        except FileNotFoundError:
            return None

    def _write(self, uri: str, text: str) -> None:
        data = text.encode("utf-8")
        if storage.is_remote(uri):
            storage.write_bytes(uri, data, self.endpoint_url)
            return
        tmp = uri + ".tagray-tmp"
        storage.write_bytes(tmp, data, self.endpoint_url)
        fs, tmp_path = storage.filesystem_for(tmp)
        fs.move(tmp_path, storage.filesystem_for(uri)[1])

    def add(self, items: list[Tagged]) -> None:
        uris = [storage.join(self.out, *item.sidecar.split("/")) for item in items]
        existing = list(self.pool.map(self._read, uris))
        merged: list[tuple[str, str]] = []
        for item, uri, old in zip(items, uris, existing, strict=True):
            try:
                merged.append((uri, merge_sidecar(old, item.tags, self.stamp, storage.redact(uri))))
            except SidecarError as e:
                self.counts["skipped"] += 1
                if len(self.examples) < EXAMPLES:
                    self.examples.append(str(e))
                log.warning("export: %s", e)
                continue
            self.counts["merged" if old is not None else "new"] += 1
        list(self.pool.map(lambda pair: self._write(*pair), merged))

    def abort(self) -> None:
        """Stops the threads; the sidecars written so far are complete (each one replaced whole)."""
        self.pool.shutdown(cancel_futures=True)

    def close(self) -> dict:
        self.pool.shutdown()
        return {**{k: self.counts[k] for k in ("new", "merged", "skipped")}, "skipped_examples": self.examples}


class TableWriter:
    """One jsonl or csv file, streamed: locally under a temporary name moved into place on close;
    on an object store straight to its name (a multipart upload appears only once complete,
    and a move there is a copy, limited to 5 GB on S3)."""

    def __init__(self, out: str, fmt: str, endpoint_url: str | None) -> None:
        self.fmt, self.endpoint_url = fmt, endpoint_url
        self.uri = storage.join(out, TABLE_FILES[fmt])
        self.tmp = self.uri if storage.is_remote(out) else storage.join(out, f"_tmp-{TABLE_FILES[fmt]}")
        storage.makedirs(out, endpoint_url)
        self.fs, path = storage.filesystem_for(self.tmp, endpoint_url)
        self.stream = self.fs.open_output_stream(path)
        self.rows = 0
        if fmt == "csv":
            self._csv([CSV_COLUMNS])

    def _csv(self, rows: list) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self.stream.write(buf.getvalue().encode("utf-8"))

    def add(self, items: list[Tagged]) -> None:
        if self.fmt == "jsonl":
            lines = [jsonio.dumps({"image_id": it.image_id, "uri": it.uri, "user_tags": it.tags.user,
                                   "user_model_tags": it.tags.user_model,
                                   "predicted": [{"tag": t, "p": _rounded(p)} for t, p in it.tags.predicted]},
                                  TABLE_FILES["jsonl"], ensure_ascii=False) for it in items]
            self.stream.write(("\n".join(lines) + "\n").encode("utf-8") if lines else b"")
        else:
            rows = []
            for it in items:
                rows += [(it.image_id, it.uri or "", "user", t, m or "", "") for t, m in zip(it.tags.user, it.tags.user_model, strict=True)]
                rows += [(it.image_id, it.uri or "", "predicted", t, t, format(_rounded(p), ".6g")) for t, p in it.tags.predicted]
            self._csv(rows)
        self.rows += len(items)

    def close(self) -> dict:
        self.stream.close()
        if self.tmp != self.uri:
            self.fs.move(storage.filesystem_for(self.tmp, self.endpoint_url)[1], storage.filesystem_for(self.uri, self.endpoint_url)[1])
        return {"file": storage.redact(self.uri)}

    def abort(self) -> None:
        """Leaves no partial file behind (on a store, that also deletes what an earlier export wrote there)."""
        self.stream.close()
        fs_path = storage.filesystem_for(self.tmp, self.endpoint_url)[1]
        if self.fs.get_file_info(fs_path).type != pafs.FileType.NotFound:
            self.fs.delete_file(fs_path)


def _rounded(p: float) -> float:
    """P as the sidecars write it (6 significant digits), so every format agrees."""
    return float(format(p, ".6g"))


# --- the export ----------------------------------------------------------------------------------

def export(args: argparse.Namespace) -> dict:
    """Scores every featurized image of the manifest and writes its tags; returns the summary."""
    t0 = time.perf_counter()
    head = load_tagger(args.model, args.endpoint_url)
    manifest, files, rows = read_inputs(args, head)
    stamp = model_stamp(head, args.model, args.min_p)
    if not stamp.calibrated:
        log.warning("export: %s is not calibrated: P(z=1|x) = σ(s) of every tag is exported, which is no calibrated "
                    "probability; fit β with `tagray calibrate` first", args.model)
    candidates = candidate_tags(head)
    normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
    vocab_index, tags = head.vocab.index, head.vocab.tags
    exported = rows[rows >= 0]
    paths = sidecar_paths(manifest, exported, args.sidecar_name, args.images_root) if args.format == "xmp" else None
    writer = (SidecarWriter(args.out, stamp, args.workers, args.endpoint_url) if args.format == "xmp"
              else TableWriter(args.out, args.format, args.endpoint_url))
    counts = Counter()
    done, lo, total = 0, 0, len(exported)
    try:
        for f, ids, x in feature_batches(files, args.batch_size, args.endpoint_url):
            batch_rows = rows[lo : lo + len(ids)]
            lo += len(ids)
            keep = np.nonzero(batch_rows >= 0)[0]
            if not len(keep):
                continue
            mrows = pa.array(batch_rows[keep])
            if not pc.all(pc.equal(manifest.column("image_id").take(mrows), ids.take(pa.array(keep)))).as_py():
                raise RuntimeError(f"{f}: feature rows came in another order than featurized_ids gave")  # a bug, not input
            p = content_probabilities(head, torch.from_numpy(x[keep]))
            if not np.isfinite(p).all():
                raise NonFiniteError(f"{args.model}: P(z=1|x) is NaN or ±inf for images of {f}")
            predicted = predicted_tags(p, candidates, tags, args.min_p)
            raw = manifest.column("tags").take(mrows).to_pylist()
            uris = manifest.column("uri").take(mrows).to_pylist()
            items = []
            for j, (image_id, uri, r, pred) in enumerate(zip(manifest.column("image_id").take(mrows).to_pylist(), uris, raw,
                                                             predicted, strict=True)):
                typed, model_tags = user_tags(r, normalizer, vocab_index)
                sidecar = paths[done + j].as_py() if paths is not None else None
                items.append(Tagged(image_id, uri, ImageTags(typed, model_tags, pred), sidecar))
                counts["predicted"] += len(pred)
                counts["user"] += len(typed)
                counts["with_predicted"] += bool(pred)
            writer.add(items)
            done += len(items)
            log.info("export: %d/%d images, %d predicted tags so far (%.0f images/s)", done, total,
                     counts["predicted"], done / max(time.perf_counter() - t0, 1e-9))
        written = writer.close()
    except BaseException:
        writer.abort()
        raise
    model_info = {"dir": storage.redact(args.model), "name": stamp.name, "head": stamp.head,
                  "vocabulary_version": stamp.vocabulary_version, "weights_digest": stamp.weights_digest,
                  "calibrated": stamp.calibrated, "tags": len(tags), "tags_exported": len(candidates)}
    summary = {
        "format": args.format, "out": storage.redact(args.out), "threshold": args.min_p, "model": model_info,
        "images": done, "images_with_predicted_tags": counts["with_predicted"],
        "tags_written": {"predicted": counts["predicted"], "user": counts["user"]},
        "features_without_manifest_row": int((rows < 0).sum()),
        "manifest_images_without_features": manifest.num_rows - len(exported),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if args.format == "xmp":
        summary["sidecars"] = {"naming": args.sidecar_name, "images_root": args.images_root, **written}
    else:
        summary.update(written)
    storage.write_text(storage.join(args.out, SUMMARY_FILE), jsonio.dumps(summary, SUMMARY_FILE, indent=1), args.endpoint_url)
    return summary


@command("export")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    s = export(args)
    what = "XMP sidecars" if s["format"] == "xmp" else s["file"]
    print(f"exported {s['images']} images: {s['tags_written']['predicted']} predicted tags with P(z) > {s['threshold']:g} "
          f"({s['images_with_predicted_tags']} images), {s['tags_written']['user']} user tags, in {s['seconds']:.1f}s")
    if s["format"] == "xmp":
        sc = s["sidecars"]
        print(f"{what}: {sc['new']} new, {sc['merged']} merged into existing ones"
              + (f", {sc['skipped']} skipped (not XMP tagray can merge into; see {SUMMARY_FILE})" if sc["skipped"] else ""))
    print(f"export → {s['out']} (summary: {SUMMARY_FILE})")
    return 0
