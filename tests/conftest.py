"""Shared fixtures: a local Ray cluster and an S3 endpoint over HTTP (moto's standalone
server on a free loopback port), plus small generated corpora."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

# Fake credentials for the local S3 endpoint; set before Ray starts so its workers inherit them.
for _key, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) is tagray.runtime's TRAIN_POLL_S,
# which init_ray gives every job: the tests run what users run.


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 2 CPUs, shared by the whole session."""
    import ray

    from tagray.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


# Loopback servers are reached directly, whatever proxy the environment names.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """URL of a moto S3 server running as its own process on 127.0.0.1."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    # bounded poll until the server answers, not a fixed sleep; an HTTP error status is an answer.
    # (Importing moto takes over a minute on a loaded 2-core machine: 60 s made whole runs error.)
    deadline = time.monotonic() + 180
    while True:
        try:
            _direct.open(url, timeout=5)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()}") from None
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket on the S3 endpoint; returns (endpoint_url, bucket name)."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return s3_endpoint, name


def free_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory):
    """`tagray demo` on 160 images, once per session: its outputs feed the demo and serve tests.
    Returns (out directory, captured stdout)."""
    import contextlib
    import io

    from tagray import cli

    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["demo", "--images", "160", "--epochs", "3", "--out", str(out), "--port", str(_free_port())])
    assert rc == 0, buf.getvalue()[-3000:]
    return out, buf.getvalue()


@pytest.fixture(scope="session")
def serve_bucket(s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="serve-images")
    return s3_endpoint, "serve-images"


_SERVED: dict = {}  # the demo app of serve_app, while it runs


def _next_module_serves(request) -> bool:
    """Whether the module run right after this one (in this session's order) uses serve_app too."""
    items = request.session.items
    last = max((i for i, item in enumerate(items) if item.module is request.module), default=len(items))
    return last + 1 < len(items) and "serve_app" in items[last + 1].fixturenames


@pytest.fixture(scope="module")
def serve_app(request, demo_run, serve_bucket):
    """The Serve app over HTTP on loopback, on the demo's calibrated RLR model and its index,
    for the tests of one module (tests/test_serve*.py). Shut down after it, so the Serve replicas
    do not hold the session cluster's 2 CPUs while later tests wait for them — unless the next
    module to run uses it too, which then takes it over as it is (its `app` redeploys the
    defaults if a test changed them) instead of starting it again."""
    from ray import serve

    from tagray.commands.serve import start
    from tagray.data.schema import read_manifest

    if not _SERVED:
        out, _ = demo_run
        endpoint, bucket = serve_bucket
        args = {"model": str(out / "model_rlr_calibrated"), "index": str(out / "index_rlr"), "buckets": [bucket],
                "endpoint_url": endpoint, "max_image_bytes": 200_000, "batch_size": 8, "batch_wait_s": 0.02}
        url = start(args, "127.0.0.1", _free_port())
        manifest = read_manifest(str(out / "manifest_split.parquet"))
        _SERVED.update({"url": url, "out": out, "args": args, "endpoint": endpoint, "bucket": bucket,
                        "uris": manifest.column("uri").to_pylist()[:20], "running": dict(args)})
    yield _SERVED
    if not _next_module_serves(request):
        _SERVED.clear()
        serve.shutdown()


@pytest.fixture
def app(serve_app):
    """The Serve app with the default model and settings (redeployed if a test changed them)."""
    from tests.serving import deploy

    deploy(serve_app, serve_app["args"])
    return serve_app
