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
