"""Every kind of model directory written to and read back from an S3 endpoint named by
`--endpoint-url` alone (MinIO, Ceph, a moto server: no AWS_ENDPOINT_URL in the environment), as
`tagray train --out s3://… --endpoint-url …`, `tagray tune`'s best model and `tagray calibrate`
write them and every command that takes `--model s3://…` reads them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagray.data.normalize import TagNormalizer, Vocabulary
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.embed_artifact import SavedEmbedHead, save_embed_head
from tagray.heads.embedding import EmbedConfig, TagMLP
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import LinearTagger
from tagray.heads.models import load_model
from tagray.heads.neighborhood import NeighborhoodNet, NeighborsConfig
from tagray.heads.net_artifact import SavedNetHead, save_net_head

TAGS = ("beach", "dog", "sunset")


def _heads(vocab: Vocabulary) -> dict[str, object]:
    torch.manual_seed(0)
    counts = np.array([5, 3, 2])
    return {
        "rlr": SavedHead(LinearTagger(4, 3), vocab, HeadConfig(head="rlr"), None, counts, np.zeros(3, bool)),
        "embed": SavedEmbedHead(TagMLP(4, (6,), 2), torch.randn(3, 2), list(TAGS), vocab, EmbedConfig(hidden=(6,), word_dim=2),
                                None, counts, np.zeros(3, bool), "random"),
        "neighbors": SavedNetHead(NeighborhoodNet(4, 3, hidden=5), vocab, NeighborsConfig(hidden=5), None, counts),
    }


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["rlr", "embed", "neighbors"])
def test_a_model_round_trips_through_an_endpoint_given_only_as_an_argument(s3_bucket, monkeypatch, kind):
    endpoint, bucket = s3_bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)  # the endpoint is the argument, as --endpoint-url passes it
    vocab = Vocabulary(TAGS, (5, 3, 2), TagNormalizer().identity())
    head = _heads(vocab)[kind]
    save = {"rlr": save_head, "embed": save_embed_head, "neighbors": save_net_head}[kind]
    uri = f"s3://{bucket}/models/{kind}"
    save(head, uri, endpoint)
    loaded = load_model(uri, endpoint)
    assert loaded.config.head == kind
    assert loaded.vocab.tags == TAGS and loaded.vocab.version == vocab.version
    module = {"rlr": "model", "embed": "mlp", "neighbors": "model"}[kind]
    saved, back = getattr(head, module).state_dict(), getattr(loaded, module).state_dict()
    assert set(saved) == set(back) and all(torch.equal(saved[k], back[k]) for k in saved)
