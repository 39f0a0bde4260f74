"""NUS-WIDE → manifest (Chua et al., *NUS-WIDE: A Real-World Web Image Database from the
National University of Singapore*, CIVR 2009; the layout of the public release).

    DIR/ImageList/Imagelist.txt                    every image, `…\\<concept>\\<NNNN>_<photo id>.jpg`;
                                                   the order of every per-image file below
    DIR/ImageList/TrainImagelist.txt, TestImagelist.txt   the official split (same path form)
    DIR/NUS_WID_Tags/All_Tags.txt                  `<photo id> tag tag …`, in Imagelist order
    DIR/Groundtruth/AllLabels/Labels_<concept>.txt  0/1 per line, in Imagelist order (81 concepts)
    DIR/NUS-WIDE-urls.txt                          a header, then `Photo_file Photo_id url_Large
                                                   url_Middle url_Small url_Original` (`null` when missing)

image_id = the photo id; tags from All_Tags; labels = the concepts whose label file has 1
on the image's line; split = `train` / `test` from the official lists (optionally a seeded
share of train moved to `val`); uri = the image under `--images DIR/<concept>/<file>` or its
Flickr URL (`url_size`, falling back to the other sizes). NUS-WIDE has no user ids: each
image is its own user_id, which the summary says.

Imagelist, All_Tags and the label files are read in lock-step, line by line; the split
lists and the URL table are held as dictionaries (269,648 entries in the release).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter

from tagray.data import storage
from tagray.data.importers.common import (
    EXAMPLES_PER_REASON,
    ImportSummary,
    ManifestWriter,
    format_error,
    is_dir,
    list_files,
    read_lines,
)

URL_SIZES = ("large", "middle", "small", "original")  # columns 3..6 of NUS-WIDE-urls.txt
NO_SPLIT = "in neither TrainImagelist nor TestImagelist (kept, split empty)"
BAD_LABEL = "label value not 0/1 (--skip-bad-labels)"


def _key(photo_file: str) -> str:
    """`C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg` → `actor/0001_2124494179.jpg`."""
    parts = photo_file.strip().replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _photo_id(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    stem, dot, _ = name.rpartition(".")
    _, under, pid = stem.partition("_")
    return pid if dot and under and pid.isdigit() else None


def _split_lists(root: str, endpoint_url: str | None) -> dict[str, str]:
    split: dict[str, str] = {}
    for name, value in (("TrainImagelist.txt", "train"), ("TestImagelist.txt", "test")):
        uri = storage.join(root, "ImageList", name)
        if not storage.exists(uri, endpoint_url):
            raise FileNotFoundError(f"{uri}: missing (the official NUS-WIDE split)")
        for line_no, line in read_lines(uri, endpoint_url):
            if not line.strip():
                continue
            key = _key(line)
            if key in split:
                raise format_error(uri, line_no, f"{key} is already in the {split[key]} list")
            split[key] = value
    return split


def _urls(root: str, url_size: str, endpoint_url: str | None) -> dict[str, str]:
    """Photo id → URL of `url_size`, else the first non-null of the other sizes."""
    uri = storage.join(root, "NUS-WIDE-urls.txt")
    order = [URL_SIZES.index(url_size)] + [i for i in range(4) if URL_SIZES[i] != url_size]
    urls: dict[str, str] = {}
    for line_no, line in read_lines(uri, endpoint_url):
        fields = line.split()
        if line_no == 1 and fields[:2] == ["Photo_file", "Photo_id"]:
            continue
        if not fields:
            continue
        if len(fields) != 6:
            raise format_error(uri, line_no, f"expected 6 fields (Photo_file Photo_id url_Large url_Middle "
                                             f"url_Small url_Original), got {len(fields)}")
        for i in order:
            if fields[2 + i] != "null":
                urls[fields[1]] = fields[2 + i]
                break
    return urls


def _val_share(photo_id: str, seed: int) -> float:
    """A stable number in [0, 1) per image and seed: which training images become `val`."""
    digest = hashlib.sha256(f"{seed}:{photo_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def import_nuswide(
    root: str,
    out: str,
    images: str | None = None,
    url_size: str = "middle",
    val: float = 0.0,
    seed: int = 0,
    skip_bad_labels: bool = False,
    endpoint_url: str | None = None,
) -> ImportSummary:
    """Writes the manifest of the NUS-WIDE release under `root` to `out`."""
    if url_size not in URL_SIZES:
        raise ValueError(f"url_size must be one of {URL_SIZES}, got {url_size!r}")
    root = root.rstrip("/")
    summary = ImportSummary("nuswide", [root])
    summary.note("NUS-WIDE has no user ids: users unknown, each image is its own user_id; "
                 "the official train/test split is kept in the `split` column")
    list_uri = storage.join(root, "ImageList", "Imagelist.txt")
    tags_uri = storage.join(root, "NUS_WID_Tags", "All_Tags.txt")
    labels_dir = storage.join(root, "Groundtruth", "AllLabels")
    for uri in (list_uri, tags_uri):
        if not storage.exists(uri, endpoint_url):
            raise FileNotFoundError(f"{uri}: missing (NUS-WIDE layout)")
    if not is_dir(labels_dir, endpoint_url):
        raise FileNotFoundError(f"{labels_dir}: missing (NUS-WIDE layout: Labels_<concept>.txt)")
    label_files = [n for n in list_files(labels_dir, endpoint_url, recursive=False)
                   if n.startswith("Labels_") and n.endswith(".txt")]
    concepts = [n[len("Labels_"):-len(".txt")] for n in label_files]
    split = _split_lists(root, endpoint_url)
    urls = None
    if images is None:
        urls = _urls(root, url_size, endpoint_url)
    elif not storage.is_remote(images):
        images = str(storage.filesystem_for(images)[1])
    if val:
        summary.note(f"val: {val:.0%} of the official train images (seed {seed}) moved to split 'val'", warn=False)

    writer = ManifestWriter(out, ("labels", "split"), endpoint_url)
    with contextlib.ExitStack() as stack:
        tag_lines = stack.enter_context(contextlib.closing(read_lines(tags_uri, endpoint_url)))
        label_uris = [storage.join(labels_dir, n) for n in label_files]
        label_lines = [stack.enter_context(contextlib.closing(read_lines(u, endpoint_url))) for u in label_uris]
        try:
            line_no, parts = 0, Counter()
            for line_no, line in read_lines(list_uri, endpoint_url):
                key = _key(line)
                pid = _photo_id(key)
                if pid is None:
                    raise format_error(list_uri, line_no, f"expected '<concept>\\<NNNN>_<photo id>.jpg', got {line!r}")
                t_no, t_line = next(tag_lines, (None, None))
                if t_line is None:
                    raise format_error(tags_uri, None, f"ends after {line_no - 1} lines; Imagelist.txt has more")
                fields = t_line.split()
                if not fields or fields[0] != pid:
                    raise format_error(tags_uri, t_no, f"expected photo id {pid} (line {line_no} of Imagelist.txt), "
                                                       f"got {fields[0] if fields else 'an empty line'!r}")
                labels, bad = [], None
                for concept, uri, lines in zip(concepts, label_uris, label_lines, strict=True):
                    l_no, value = next(lines, (None, None))
                    if value is None:
                        raise format_error(uri, None, f"ends after {line_no - 1} lines; Imagelist.txt has more")
                    value = value.strip()
                    if value == "1":
                        labels.append(concept)
                    elif value != "0":
                        bad = bad or (uri, l_no, value)
                if bad:
                    if not skip_bad_labels:
                        raise format_error(bad[0], bad[1], f"label value {bad[2]!r} is not 0 or 1 "
                                                           "(--skip-bad-labels skips such images, counted)")
                    summary.skip(BAD_LABEL, f"{bad[0]}:{bad[1]}: {bad[2]!r}")
                    continue
                part = split.get(key)
                if part is None and parts[None] < EXAMPLES_PER_REASON:
                    summary.examples.setdefault(NO_SPLIT, []).append(key)
                elif part == "train" and val and _val_share(pid, seed) < val:
                    part = "val"
                if urls is not None:
                    uri = urls.get(pid)
                    if uri is None:
                        summary.skip("no URL in NUS-WIDE-urls.txt", pid)
                        continue
                else:
                    uri = storage.join(images, *key.split("/"))
                writer.add(where=f"{list_uri}:{line_no}", image_id=pid, user_id=pid, uri=uri,
                           tags=fields[1:], labels=labels, split=part)
                parts[part] += 1
            for what, lines, uri in [("All_Tags.txt", tag_lines, tags_uri), *zip(label_files, label_lines, label_uris, strict=True)]:
                extra = next(((n, x) for n, x in lines if x.strip()), None)
                if extra is not None:
                    raise format_error(uri, extra[0], f"{what} has more lines than Imagelist.txt ({line_no})")
            writer.close()
        except BaseException:
            writer.abort()
            raise
    summary.rows = writer.rows
    summary.counts.update({"images": writer.rows, "concepts": len(concepts),
                           **{f"split_{k or 'none'}": v for k, v in sorted(parts.items(), key=str)}})
    if parts[None]:
        summary.note(f"{parts[None]} image(s) in neither TrainImagelist.txt nor TestImagelist.txt: split left empty")
    return summary
