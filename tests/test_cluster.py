"""Running tagray on a cluster: every definition in clusters/ has the keys tagray relies on,
and `ray job submit --working-dir … -- tagray train …` succeeds on a real local cluster
(`ray start --head` on loopback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tagray.config import from_dict
from tagray.serve.service import ServeConfig

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _load(name: str) -> dict:
    text = (REPO / "clusters" / name).read_text()
    assert text.startswith("#") and "Used by:" in text, f"{name} should open with the command that uses it"
    return yaml.safe_load(text)


def test_cluster_launcher_configs():
    for name in ("aws-gpu.yaml", "local.yaml"):
        cfg = _load(name)
        assert cfg["cluster_name"] and cfg["provider"]["type"] in ("aws", "local")
        assert any("scripts/setup.sh" in c for c in cfg["setup_commands"])
        assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    aws = _load("aws-gpu.yaml")
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "a GPU worker type"


def test_kuberay_manifests():
    job = _load("rayjob-train.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("tagray train ")
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"])
    service = _load("rayservice.yaml")
    assert service["kind"] == "RayService"
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "tagray.serve.app:build_app"
    cfg = from_dict(ServeConfig, app["args"], "rayservice args")  # every key is a ServeConfig field
    assert cfg.model.startswith("s3://") and cfg.index.startswith("s3://")
    assert {d["name"] for d in app["deployments"]} <= {"Tagger", "Searcher", "Ingress"}


@pytest.mark.integration
def test_ray_job_submit_trains_on_a_local_cluster(tmp_path):
    from tagray.data.schema import read_manifest, write_manifest
    from tagray.data.split import SplitConfig, assign_splits
    from tagray.data.synth import SynthConfig, synthesize
    from tests.conftest import free_port

    data = tmp_path / "data"
    written = synthesize(SynthConfig(images=1500, seed=4, feature_dim=32), str(data), features_only=True)
    write_manifest(assign_splits(read_manifest(written["manifest"]), SplitConfig(seed=0)), str(data / "split.parquet"))
    model = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled")
    gcs, dashboard = free_port(), free_port()
    # Every port of its own: the session's local Ray (ray_local) already holds Ray's defaults,
    # and a job agent that cannot bind leaves the dashboard with "No available agent".
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp = Path("/tmp") / f"tagray-job-{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp}", *own_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for_dashboard(f"http://127.0.0.1:{dashboard}/api/version", head)
        command = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
                   str(data), "--", "tagray", "train", "--head", "rlr", "--manifest", "split.parquet", "--features",
                   "features.parquet", "--out", str(model), "epochs=2", "batch_size=100", "worker_cpus=0.5"]
        deadline = time.monotonic() + 120
        while True:  # the dashboard answers before the node's job agent has registered: retry that one error
            submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
            if "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
        for name in ("weights.safetensors", "tags.parquet", "model.json", "metrics.json"):
            assert (model / name).exists(), name
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120.0) -> None:
    """Polls the dashboard's version endpoint (bounded) until the head answers."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start: {head.stdout.read() if head.poll() is not None else ''}") from None
            time.sleep(0.5)
