"""What a sweep computes once for all its trials, in process: the Jaccard neighbours a trial takes
from the sweep's shared ones (the first M columns of the widest M swept) are the ones it would
compute itself, for the exact index and for MinHash LSH (tagray/tune/sweep.py `shared_neighbors`;
on Ray: tests/test_neighbors_cli.py's sweep)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tagray.config import load_config
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.heads.neighborhood import NEIGHBOR_SETTINGS, NeighborsConfig
from tagray.tune.space import TuneConfig
from tagray.tune.sweep import SweepData, neighbor_key, trial_neighbors
from tests.corpora import split_corpus


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SweepData:
    corpus = split_corpus(tmp_path_factory.mktemp("shared"), 1500, seed=3, feature_dim=16)
    sweep = TuneConfig(head="neighbors", search_space={"max_rank": {"grid": [3, 9]}})
    return SweepData(corpus["manifest"], corpus["features"], sweep,
                     TagNormalizer(load_config(NormalizerConfig, "normalize.yaml")))


@pytest.mark.parametrize("search", ["index", "lsh"])
def test_a_trial_takes_the_first_m_of_the_shared_neighbours_and_they_are_its_own(data, search):
    wide = NeighborsConfig(search=search, max_rank=9, tau=60)
    shared = {neighbor_key(wide): trial_neighbors(wide, data)}
    assert shared[neighbor_key(wide)]["train"].shape[1] == 9
    for m in (1, 3, 9):
        cfg = dataclasses.replace(wide, max_rank=m, m=1)
        taken, computed = trial_neighbors(cfg, data, shared), trial_neighbors(cfg, data)
        assert set(taken) == set(computed) == {"train", "val"}
        for split in taken:
            assert taken[split].shape == (len(data.parts[split]), m)
            np.testing.assert_array_equal(taken[split], computed[split])
        assert (computed["train"] >= 0).any()  # neighbours were found (an all −1 array would pass vacuously)


def test_other_neighbour_settings_are_not_taken_from_the_shared_ones(data):
    wide = NeighborsConfig(max_rank=9, tau=60)
    other = dataclasses.replace(wide, tau=5)  # another vocabulary of tags: other neighbours
    assert neighbor_key(other) != neighbor_key(wide) and "tau" in NEIGHBOR_SETTINGS
    shared = {neighbor_key(wide): trial_neighbors(wide, data)}
    mine = trial_neighbors(dataclasses.replace(other, max_rank=3, m=1), data, shared)
    assert not np.array_equal(mine["train"], shared[neighbor_key(wide)]["train"][:, :3])
