"""The GPU tier (issue 14): featurize under bf16 autocast, `tagray train --gpu` with 1 and 2
workers for every head, and the Serve app with `num_gpus: 1`. Each GPU result is checked
against the same thing computed on CPU in the same test (fp32 features, a CPU run of the
same command, the in-process Tagger), and the model, batch and replica are asked where they ran.

Skipped without CUDA (`torch.cuda.is_available()`); the 2-worker runs need two GPUs (one
per Ray Train worker). On a GPU machine: `pytest -m gpu` (or `make test-gpu`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tagray import cli
from tests.corpora import split_corpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

HEADS = ("lr", "rlr", "embed", "neighbors", "refine")
# Small settings per head (plumbing and agreement with CPU, not quality); from the CPU CLI tests.
SETTINGS = {
    "lr": ["epochs=3", "lr=0.01", "checkpoint_every=10"],
    "rlr": ["epochs=3", "lr=0.01", "checkpoint_every=10"],
    "embed": ["epochs=3", "hidden=[128]", "checkpoint_every=15", "batch_size=128", "oov_steps=200", "shards=2"],
    "neighbors": ["epochs=4", "lr=1e-3", "hidden=128", "target=labels"],
    "refine": ["epochs=2", "init_epochs=4", "init_lr=3e-3", "lr=0.1", "hidden=256", "max_rank=16"],
}
EXTRA_FLAGS = {"neighbors": ["--metadata", "tags"]}


def _needs_gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs (one per Ray Train worker); this machine has {torch.cuda.device_count()}")


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    from tagray.data.word_vectors import write_synthetic_word_vectors

    corpus = split_corpus(tmp_path_factory.mktemp("gpu"), 4000, seed=1, feature_dim=64)
    corpus["vectors"] = write_synthetic_word_vectors(corpus["truth"], str(corpus["dir"] / "vectors.txt"), dim=32)
    return corpus


_CPU_RUNS: dict[tuple[str, int], dict] = {}


def _train(corpus, head: str, workers: int, gpu: bool) -> tuple[Path, dict]:
    out = corpus["dir"] / f"{head}-{workers}-{'gpu' if gpu else 'cpu'}"
    argv = ["train", "--head", head, "--manifest", corpus["manifest"], "--features", corpus["features"],
            "--out", str(out), "--workers", str(workers), *EXTRA_FLAGS.get(head, []), *SETTINGS[head], "worker_cpus=0.5"]
    if head == "embed":
        argv += ["--vectors", corpus["vectors"]]
    if gpu:
        argv.append("--gpu")
    assert cli.main(argv) == 0
    return out, json.loads((out / "metrics.json").read_text())


def _cpu_reference(corpus, head: str, workers: int) -> dict:
    """The same command on CPU (once per head and worker count)."""
    if (head, workers) not in _CPU_RUNS:
        _CPU_RUNS[head, workers] = _train(corpus, head, workers, gpu=False)[1]
    return _CPU_RUNS[head, workers]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("head", HEADS)
def test_train_on_gpu_finishes_on_the_gpu_and_matches_cpu(corpus, head, workers):
    from tagray.heads.models import load_model

    _needs_gpus(workers)
    out, metrics = _train(corpus, head, workers, gpu=True)
    cpu = _cpu_reference(corpus, head, workers)
    assert metrics["head"] == head and metrics["workers"] == workers
    # the worker's device (rank 0's `ray.train.torch.get_device()`), recorded by the run
    assert str(metrics.get("device", "")).startswith("cuda"), f"metrics.json names no cuda device: {metrics.get('device')!r}"
    assert len(metrics["history"]) == len(cpu["history"]) >= 1
    assert all(np.isfinite(h["loss"]) for h in metrics["history"])
    # The same seed and data on GPU: the same training, up to float reduction order.
    assert metrics["final_loss"] == pytest.approx(cpu["final_loss"], rel=0.02, abs=1e-4)
    if "best_val_map" in cpu:
        assert metrics["best_val_map"] == pytest.approx(cpu["best_val_map"], abs=0.02)
    if "mean_pi" in cpu:
        assert metrics["mean_pi"] == pytest.approx(cpu["mean_pi"], abs=0.01)
    # The model it wrote loads on a machine without a GPU (weights saved from the CPU copy).
    saved = load_model(str(out))
    net = saved.mlp if head == "embed" else saved.model
    params = list(net.parameters())
    assert params and all(p.device.type == "cpu" and torch.isfinite(p).all() for p in params)


def test_featurize_on_gpu_under_bf16_matches_fp32_on_cpu(ray_local, tmp_path):
    """The backbone actors run on the GPU under bf16 autocast (features/embed.Embedder); the
    features agree with the fp32 CPU backbone on the same decoded crops to bf16's precision."""
    from tagray.data import schema, storage
    from tagray.data.synth import SynthConfig, synthesize
    from tagray.features import store
    from tagray.features.backbone import build_backbone
    from tagray.features.decode import decode
    from tagray.features.pipeline import FeaturizeConfig, featurize

    written = synthesize(SynthConfig(images=48, seed=3, render_batch=48), str(tmp_path / "corpus"))
    cfg = FeaturizeConfig(backbone="resnet18", weights="random", image_size=64, resize_size=72, batch_size=16,
                          decode_batch_size=8, actors=1, gpu=True, shard_rows=32, block_rows=8)
    summary = featurize(written["manifest"], str(tmp_path / "features"), cfg)
    assert summary["featurized"] == 48 and summary["errors"] == 0
    assert summary["resources"]["gpu"] is True
    table, identity = store.read_features(str(tmp_path / "features"))
    got = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
    uris = dict(zip(*(schema.read_manifest(written["manifest"]).column(c).to_pylist() for c in ("image_id", "uri")),
                    strict=True))
    pixels = np.stack([decode(storage.read_bytes(uris[i]), 64, 72, cfg.max_pixels) for i in table.column("image_id").to_pylist()])
    model, _ = build_backbone("resnet18", None, seed=0)
    mean = torch.tensor(identity["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(identity["std"]).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        want = model((torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - mean) / std).numpy()
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > 0.99, cos.min()
    assert np.abs(got - want).max() > 0  # computed on the GPU, not a CPU fallback with the same kernels


def test_serve_with_one_gpu_tags_like_the_cpu_tagger(demo_run):
    import requests
    from ray import serve
    from ray.util.state import list_actors

    from tagray.commands.serve import start
    from tagray.data import storage
    from tagray.data.schema import read_manifest
    from tagray.serve.service import ServeConfig, TaggingService
    from tests.conftest import free_port

    out, _ = demo_run
    args = {"model": str(out / "model_rlr_calibrated"), "index": str(out / "index_rlr"), "num_gpus": 1,
            "batch_size": 8, "batch_wait_s": 0.02}
    uris = read_manifest(str(out / "manifest_split.parquet")).column("uri").to_pylist()[:8]
    url = start(args, "127.0.0.1", free_port())
    try:
        import ray

        taggers = [a for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
                   if "Tagger" in (a.class_name or "")]
        assert taggers and all(a.required_resources.get("GPU") == 1 for a in taggers), taggers
        info = requests.get(f"{url}v1/model", timeout=60).json()
        assert str(info.get("device", "")).startswith("cuda"), f"/v1/model names no cuda device: {info}"
        cpu = TaggingService(args["model"], ServeConfig(**{k: v for k, v in args.items() if k != "num_gpus"}))
        for uri in uris:
            data = storage.read_bytes(uri)
            r = requests.post(f"{url}v1/tag", params={"k": 5}, files={"file": ("x.jpg", data, "image/jpeg")}, timeout=60)
            assert r.status_code == 200, r.text
            expected = cpu.tag([cpu.decode(data)], [5], [0.0])[0]
            got = {t["tag"]: t["p_true"] for t in r.json()["tags"]}
            top = [t for t in expected if t["p_true"] - expected[-1]["p_true"] > 1e-3]  # ties at the cut may swap
            for t in top:
                assert got.get(t["tag"]) == pytest.approx(t["p_true"], rel=1e-2, abs=1e-4), (t, got)
    finally:
        serve.shutdown()
