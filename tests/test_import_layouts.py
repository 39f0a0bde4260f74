"""Builders of small corpora in the exact layouts of the public releases (MIRFlickr, NUS-WIDE,
YFCC100M) for the importer tests; each returns what the manifest should hold."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote_plus

import numpy as np

from tagray.data.render import encode_jpeg, make_signatures, render_image

CONCEPTS = ("sky", "water", "tree", "dog")  # MIRFlickr-25K concept names (4 of the 24)
NOISE = ("2009", "nikon", "explore", "holiday", "friends")


def _image_tags(rng: np.random.Generator, concepts: list[str]) -> list[str]:
    """Noisy user tags: each present concept tagged with p 0.7 (sometimes a plural, title case)."""
    tags = []
    for c in concepts:
        if rng.random() < 0.7:
            tags.append(rng.choice([c, c.title(), c + "s"]))
    tags += list(rng.choice(NOISE, size=int(rng.integers(0, 3)), replace=False))
    return tags


def draw(n: int, seed: int) -> list[dict]:
    """n images: concepts (1–2 of CONCEPTS), their tags, the owner (one in 5)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = 1 + int(rng.random() < 0.4)
        idx = sorted(rng.choice(len(CONCEPTS), size=k, replace=False).tolist())
        concepts = [CONCEPTS[j] for j in idx]
        out.append({"index": idx, "concepts": concepts, "tags": _image_tags(rng, concepts), "owner": f"{i // 5}@N0{seed}"})
    return out


def jpeg(index: list[int], seed: int, size: int = 64) -> bytes:
    """A rendered JPEG showing the concepts `index` (tagray's synthetic gratings)."""
    sigs = make_signatures(len(CONCEPTS), np.random.default_rng(0))
    return encode_jpeg(render_image(index, sigs, size, np.random.default_rng(seed)), 85)


def mirflickr(root: Path, n: int = 60, seed: int = 0, images: bool = True, owners: bool = True,
              raw: bool = True, images_subdir: bool = False) -> list[dict]:
    """DIR/im<N>.jpg, meta/tags_raw/tags<N>.txt, annotations/<concept>[_r1].txt (+ README.txt),
    doc/owner_ids.txt (the owner of image N on line N)."""
    rows = draw(n, seed)
    tags_dir = root / "meta" / ("tags_raw" if raw else "tags")
    tags_dir.mkdir(parents=True)
    (root / "annotations").mkdir()
    img_dir = root / "images" if images_subdir else root
    img_dir.mkdir(exist_ok=True)
    for i, r in enumerate(rows, 1):
        (tags_dir / f"tags{i}.txt").write_text("".join(t + "\r\n" for t in r["tags"]))
        if images:
            (img_dir / f"im{i}.jpg").write_bytes(jpeg(r["index"], seed * 1000 + i))
    for c in CONCEPTS:
        numbers = [i for i, r in enumerate(rows, 1) if c in r["concepts"]]
        (root / "annotations" / f"{c}.txt").write_text("".join(f"{i}\n" for i in numbers))
        # r1 ("relevant"): the stricter subset, here every other image of the concept
        (root / "annotations" / f"{c}_r1.txt").write_text("".join(f"{i}\n" for i in numbers[::2]))
    (root / "annotations" / "README.txt").write_text("MIRFLICKR-25000 annotations v080\n")
    if owners:
        (root / "doc").mkdir()
        (root / "doc" / "owner_ids.txt").write_text("".join(r["owner"] + "\n" for r in rows))
    return rows


def nuswide(root: Path, n: int = 40, seed: int = 1, all_concepts: tuple[str, ...] = CONCEPTS) -> list[dict]:
    """ImageList/{Imagelist,TrainImagelist,TestImagelist}.txt, NUS_WID_Tags/All_Tags.txt,
    Groundtruth/AllLabels/Labels_<concept>.txt, NUS-WIDE-urls.txt; rows with `photo_id`,
    `file` (`<concept>\\<NNNN>_<id>.jpg`), `split`, `url`."""
    rows = draw(n, seed)
    for d in ("ImageList", "NUS_WID_Tags", "Groundtruth/AllLabels"):
        (root / d).mkdir(parents=True)
    lines, train, test, tags, urls = [], [], [], [], ["Photo_file Photo_id url_Large url_Middle url_Small url_Original"]
    for i, r in enumerate(rows):
        r["photo_id"] = str(2124494179 + 7919 * i)
        r["file"] = f"{r['concepts'][0]}\\{i + 1:04d}_{r['photo_id']}.jpg"
        r["split"] = "train" if i % 3 else "test"
        lines.append(f"C:\\ImageData\\Flickr\\{r['file']}")
        (train if r["split"] == "train" else test).append(r["file"])
        r["tags"] = [t.lower().replace(" ", "") for t in r["tags"]]
        tags.append(f"      {r['photo_id']}      " + " ".join(r["tags"]) + " ")
        middle = "null" if i == 3 else f"http://farm4.static.flickr.com/3/{r['photo_id']}_ab12_m.jpg"
        large = f"http://farm4.static.flickr.com/3/{r['photo_id']}_ab12_b.jpg"
        r["url"] = large if middle == "null" else middle
        urls.append(f"C:\\ImageData\\Flickr\\{r['file']} {r['photo_id']} {large} {middle} null null")
    (root / "ImageList" / "Imagelist.txt").write_text("\r\n".join(lines) + "\r\n")
    (root / "ImageList" / "TrainImagelist.txt").write_text("".join(f + "\n" for f in train))
    (root / "ImageList" / "TestImagelist.txt").write_text("".join(f + "\n" for f in test))
    (root / "NUS_WID_Tags" / "All_Tags.txt").write_text("\n".join(tags) + "\n")
    for c in all_concepts:
        values = ["1" if c in r["concepts"] else "0" for r in rows]
        (root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt").write_text("\n".join(values) + "\n")
    (root / "NUS-WIDE-urls.txt").write_text("\n".join(urls) + "\n")
    return rows


def yfcc_row(i: int, tags: list[str], nsid: str, video: bool = False, columns: int = 25) -> str:
    """One line of the YFCC100M dataset file (25 columns; 23 without line number and md5)."""
    pid = str(10_000_000 + i)
    fields = [str(i), pid, f"{i:032x}", nsid, "some+one", "2010-07-04 12:00:00.0", "1278259200",
              "Canon+EOS+400D", "a+title", "", ",".join(quote_plus(t) for t in tags), "", "", "", "",
              f"http://www.flickr.com/photos/x/{pid}/", f"http://farm6.staticflickr.com/5/{pid}_s3c.jpg",
              "Attribution License", "http://creativecommons.org/licenses/by/2.0/", "5", "6", "s3c", "0r1g",
              "jpg", "1" if video else "0"]
    if columns == 23:
        fields = fields[1:2] + fields[3:]
    return "\t".join(fields)
