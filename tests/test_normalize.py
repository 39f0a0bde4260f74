"""Tag normalisation on real words with real WordNet data (seed 001 §3.3, §5)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tagray.data.normalize import NormalizerConfig, NormalizerMismatch, TagNormalizer, Vocabulary


@pytest.fixture(scope="module")
def normalizer():
    return TagNormalizer()


def _norm(normalizer, lists):
    return normalizer.normalize_lists(pa.array(lists, pa.list_(pa.string()))).to_pylist()


def test_plurals_merge_with_wordnet(normalizer):
    assert _norm(normalizer, [["cars", "Dogs", "leaves", "churches", "butterflies", "people", "glass"]]) == [
        ["car", "dog", "leaf", "church", "butterfly", "people", "glass"]
    ]


def test_clean_url_decode_case_and_dedupe_in_order(normalizer):
    assert _norm(normalizer, [["  New%20York ", "#Beach", "beaches", "Car", "cars", "sunset"]]) == [
        ["new york", "beach", "car", "sunset"]
    ]


def test_non_image_tags_dropped(normalizer):
    assert _norm(normalizer, [["2012", "beach", "Nikon", "d90", "explore", "1999", "DSC_0042", "iphone"]]) == [["beach"]]
    keep_all = TagNormalizer(NormalizerConfig(drop_non_image=False))
    assert _norm(keep_all, [["2012", "beach", "nikon"]]) == [["2012", "beach", "nikon"]]


def test_first_twenty_tags_only(normalizer):
    raw = [f"w{i}" for i in range(30)]
    raw[25] = "beach"  # past the cut: dropped even though it is a good tag
    out = _norm(TagNormalizer(NormalizerConfig(lemmatize=False)), [raw])[0]
    assert out == [f"w{i}" for i in range(20)]
    # The cut is on the raw list: dropped non-image tags still use up positions.
    raw = ["2010"] * 19 + ["beach", "sunset"]
    assert _norm(normalizer, [raw]) == [["beach"]]


def test_wordnet_only_filter():
    wn_only = TagNormalizer(NormalizerConfig(wordnet_only=True))
    assert _norm(wn_only, [["instagood", "beach", "cosplayz", "new york", "sunsets"]]) == [["beach", "new york", "sunset"]]


def test_null_and_empty_lists(normalizer):
    assert _norm(normalizer, [None, [], ["", "  "], ["cat"]]) == [[], [], [], ["cat"]]


def test_vocabulary_min_images_and_top_k(normalizer, tmp_path):
    lists = [["cat", "dog"], ["cats", "sun"], ["cat", "dog"], ["tree"]]
    normed = normalizer.normalize_lists(pa.array(lists))
    vocab = Vocabulary.build(normed, TagNormalizer(NormalizerConfig(min_images=2)))
    assert vocab.tags == ("cat", "dog") and vocab.counts == (3, 2)
    top1 = Vocabulary.build(normed, TagNormalizer(NormalizerConfig(min_images=1, top_k=1)))
    assert top1.tags == ("cat",)
    rows, cols = vocab.to_coo(normed)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="min_images=9"):
        Vocabulary.build(normed, TagNormalizer(NormalizerConfig(min_images=9)))


def test_vocabulary_artifact_round_trip_and_mismatch(tmp_path):
    made_with = TagNormalizer(NormalizerConfig(min_images=1))
    vocab = Vocabulary.build(made_with.normalize_lists(pa.array([["cats", "dog"]])), made_with)
    vocab.save(str(tmp_path))
    back = Vocabulary.load(str(tmp_path), expected=TagNormalizer(NormalizerConfig(min_images=1)))
    assert back.tags == vocab.tags and back.version == vocab.version
    with pytest.raises(NormalizerMismatch, match=r"max_tags: saved 20, now 10"):
        Vocabulary.load(str(tmp_path), expected=TagNormalizer(NormalizerConfig(min_images=1, max_tags=10)))


def test_wordnet_loads_without_nltks_identity_map_and_reads_the_same_senses():
    """tagray.data.wordnet skips nltk's OMW map from WordNet 3.0 to the loaded 3.0 (the identity;
    3.5 of 5.3 s of a process's load): the reader has no map, nltk's method is put back, and a
    reader nltk builds its own way (with the map) gives the same senses and lemmas."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from tagray.data.wordnet import lemmatizer, wordnet

    wn = wordnet()
    assert wn.get_version() == "3.0" and wn.map30 is None
    assert WordNetCorpusReader.map_wn.__qualname__ == "WordNetCorpusReader.map_wn"  # not left patched
    reference = WordNetCorpusReader(wn.root, None)  # nltk's own load: builds the map
    # the identity, up to the satellite-adjective alias nltk adds for OMW's "a" offsets
    assert reference.map30 and all(v == k or (k.endswith("-a") and v == k[:-1] + "s") for k, v in reference.map30.items())
    for word in ("dogs", "beaches", "sunset", "geese", "running"):
        assert [s.name() for s in wn.synsets(word)] == [s.name() for s in reference.synsets(word)]
    assert lemmatizer().lemmatize("geese") == "goose"
