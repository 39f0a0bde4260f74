"""MIRFlickr-25K / MIRFlickr-1M → manifest (Huiskes & Lew, *The MIR Flickr Retrieval
Evaluation*, 2008; the layout of the release archives).

    DIR/im<N>.jpg  (or DIR/images/im<N>.jpg)      the photos; need not exist to import
    DIR/meta/tags_raw/tags<N>.txt                  tags as typed, one a line, upload order
    DIR/meta/tags/tags<N>.txt                      (used when tags_raw is absent)
    DIR/annotations/<concept>.txt                  1-based image numbers; the 24 concepts
    DIR/annotations/<concept>_r1.txt               the stricter "relevant" judgements (--labels r1)
    DIR/doc/owner_ids.txt                          optional: the owner of image N on line N,
                                                   or "<image> <owner>" lines (image: im<N>[.jpg] or N)

One row per tags file: image_id `im<N>`, uri the image path, tags the file's lines,
labels the concepts whose annotation file lists N. Without owner ids every image is its
own user (said in the summary), so `tagray split` splits by image.
"""

from __future__ import annotations

import re

from tagray.data import storage
from tagray.data.importers.common import (
    ImportSummary,
    ManifestWriter,
    format_error,
    is_dir,
    list_files,
    read_lines,
)

TAGS_FILE = re.compile(r"tags(\d+)\.txt")
IMAGE_REF = re.compile(r"(?:im)?(\d+)(?:\.jpe?g)?", re.IGNORECASE)
LABEL_SETS = ("concepts", "r1")


def _tags_dir(root: str, endpoint_url: str | None) -> str:
    for sub in ("meta/tags_raw", "meta/tags"):
        d = storage.join(root, sub)
        if is_dir(d, endpoint_url):
            return d
    raise FileNotFoundError(f"{root}: neither meta/tags_raw/ nor meta/tags/ found (MIRFlickr layout)")


def _annotations(root: str, label_set: str, numbers: set[int], endpoint_url: str | None) -> dict[int, list[str]]:
    """Image number → concepts, from annotations/<concept>.txt (or <concept>_r1.txt)."""
    d = storage.join(root, "annotations")
    if not is_dir(d, endpoint_url):
        return {}
    labels: dict[int, list[str]] = {}
    names = [n for n in list_files(d, endpoint_url, recursive=False) if n.endswith(".txt")]
    names = [n for n in names if not n.lower().startswith("readme")]
    wanted = [n for n in names if n.endswith("_r1.txt") == (label_set == "r1")]
    for name in wanted:
        concept = name[: -len("_r1.txt")] if label_set == "r1" else name[: -len(".txt")]
        uri = storage.join(d, name)
        for line_no, line in read_lines(uri, endpoint_url):
            text = line.strip()
            if not text:
                continue
            if not text.isdigit():
                raise format_error(uri, line_no, f"expected a 1-based image number, got {text!r}")
            n = int(text)
            if n not in numbers:
                raise format_error(uri, line_no, f"image {n} has no tags file (meta/tags*/tags{n}.txt)")
            labels.setdefault(n, []).append(concept)
    return labels


def _owners(root: str, numbers: set[int], endpoint_url: str | None) -> dict[int, str] | None:
    uri = storage.join(root, "doc", "owner_ids.txt")
    if not storage.exists(uri, endpoint_url):
        return None
    owners: dict[int, str] = {}
    for line_no, line in read_lines(uri, endpoint_url):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            n, owner = line_no, fields[0]
        elif len(fields) == 2 and (m := IMAGE_REF.fullmatch(fields[0])):
            n, owner = int(m.group(1)), fields[1]
        else:
            raise format_error(uri, line_no, f"expected '<owner>' or '<image> <owner>', got {line!r}")
        if n in numbers:
            owners[n] = owner
    return owners


def import_mirflickr(
    root: str,
    writer_uri: str,
    label_set: str = "concepts",
    endpoint_url: str | None = None,
) -> ImportSummary:
    """Writes the manifest of the MIRFlickr corpus under `root` to `writer_uri`."""
    if label_set not in LABEL_SETS:
        raise ValueError(f"label_set must be one of {LABEL_SETS}, got {label_set!r}")
    root = root.rstrip("/")
    summary = ImportSummary("mirflickr", [root])
    tags_dir = _tags_dir(root, endpoint_url)
    if tags_dir.endswith("meta/tags"):
        summary.note(f"{root}: no meta/tags_raw/; using meta/tags/ (Flickr's cleaned tags, not as typed)")
    numbers: dict[int, str] = {}
    for name in list_files(tags_dir, endpoint_url, recursive=False):
        m = TAGS_FILE.fullmatch(name)
        if m:
            numbers[int(m.group(1))] = name
        else:
            summary.skip("not a tags<N>.txt file", storage.join(tags_dir, name))
    if not numbers:
        raise FileNotFoundError(f"{tags_dir}: no tags<N>.txt files")
    images_dir = storage.join(root, "images") if is_dir(storage.join(root, "images"), endpoint_url) else root
    if not storage.is_remote(images_dir):
        images_dir = str(storage.filesystem_for(images_dir)[1])  # absolute: the manifest may move
    labels = _annotations(root, label_set, set(numbers), endpoint_url)
    owners = _owners(root, set(numbers), endpoint_url)
    if owners is None:
        summary.note(f"{root}: no doc/owner_ids.txt; users unknown, each image is its own user_id")
        owners = {}
    elif len(owners) < len(numbers):
        summary.note(f"{len(numbers) - len(owners)} image(s) missing from doc/owner_ids.txt are their own user_id")
    columns = ("labels",) if labels or is_dir(storage.join(root, "annotations"), endpoint_url) else ()
    writer = ManifestWriter(writer_uri, columns, endpoint_url)
    try:
        for n in sorted(numbers):
            tags_uri = storage.join(tags_dir, numbers[n])
            tags = [t.strip() for _, t in read_lines(tags_uri, endpoint_url)]
            row = dict(image_id=f"im{n}", user_id=owners.get(n, f"im{n}"),
                       uri=storage.join(images_dir, f"im{n}.jpg"), tags=[t for t in tags if t])
            if columns:
                row["labels"] = sorted(labels.get(n, []))
            writer.add(where=tags_uri, **row)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.rows = writer.rows
    summary.counts = {"images": writer.rows, "with_labels": len(labels), "with_owner": len(owners),
                      "concepts": len({c for cs in labels.values() for c in cs})}
    return summary
