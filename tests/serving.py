"""Helpers of the HTTP tests of the Serve app (tests/test_serve*.py)."""

from __future__ import annotations

import time

import requests


def wait_for(check, what: str, timeout: float = 120.0):
    """Polls `check` until it returns a truthy value (bounded), returning it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def tag_request(app, data: bytes, k: int = 5, **params) -> requests.Response:
    return requests.post(f"{app['url']}v1/tag", params={"k": k, **params},
                         files={"file": ("photo.jpg", data, "image/jpeg")}, timeout=60)


def error_of(r: requests.Response) -> dict:
    """The one error shape: {"error": {"code", "message"}}; anything else fails the test."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, r.text
    return body["error"]


def actor_pid(kind: str) -> int:
    import ray
    from ray.util.state import list_actors

    actors = [a for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")]) if kind in (a.class_name or "")]
    assert actors, f"no live {kind} actor"
    return actors[0].pid


def memory_mb(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, in MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


def deploy(app: dict, args: dict) -> None:
    """Deploys the app with `args` unless that is what runs already (tests that need another
    model or settings deploy it; the next test that needs the default puts it back, once)."""
    from ray import serve

    from tagray.serve.app import build_app

    if app.get("running") == args:
        return
    app["running"] = None  # unknown until this deploy has succeeded
    serve.run(build_app(args), name="tagray", route_prefix="/")
    app["running"] = dict(args)
