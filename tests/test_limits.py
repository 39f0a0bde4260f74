"""The body caps as plain ASGI apps (tagray/serve/limits.py), without Serve: a declared
Content-Length over the cap is refused before any body is read; a chunked body is cut off at
the cap — the Ingress' middleware raises where the app reads, the proxy's answers 413 and tells
the app behind it that the client left, so nothing past the cap is pulled from the client."""

from __future__ import annotations

import asyncio
import json

from tagray.serve.limits import BodyLimitMiddleware, ProxyBodyLimit


def _client(chunks: int, size: int, headers: list[tuple[bytes, bytes]]):
    """A scope and a receive() handing out `chunks` body messages of `size` bytes; counts pulls."""
    pulled = {"n": 0}

    async def receive():
        pulled["n"] += 1
        more = pulled["n"] < chunks
        return {"type": "http.request", "body": b"x" * size, "more_body": more}

    scope = {"type": "http", "method": "POST", "path": "/v1/tag", "headers": headers}
    return scope, receive, pulled


def _run(middleware, scope, receive):
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(body) if body.startswith(b"{") else None, sent


def test_the_proxy_cap_answers_413_and_stops_pulling_the_body():
    seen = []

    async def forwarding_app(scope, receive, send):  # like Serve's proxy: reads until the body ends
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        if seen[-1] == "http.disconnect":  # an app that asks again is told the same, the client not read
            seen.extend([(await receive())["type"] for _ in range(3)])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"forwarded"})

    scope, receive, pulled = _client(chunks=10_000, size=65536, headers=[(b"content-type", b"multipart/form-data")])
    status, body, sent = _run(ProxyBodyLimit(forwarding_app, max_bytes=1_000_000), scope, receive)
    assert status == 413 and body["error"]["code"] == "too_large"
    assert pulled["n"] == 1_000_000 // 65536 + 1  # the first chunk past the cap is the last one pulled
    assert seen[-4:] == ["http.disconnect"] * 4  # the app behind was told the client left, and stays told
    assert not any(m.get("body") == b"forwarded" for m in sent)  # and its own answer was dropped

    scope, receive, pulled = _client(chunks=1, size=10, headers=[(b"content-length", b"5000000000")])
    status, body, _ = _run(ProxyBodyLimit(forwarding_app, max_bytes=1_000_000), scope, receive)
    assert status == 413 and pulled["n"] == 0 and "5000000000 bytes" in body["error"]["message"]

    scope, receive, pulled = _client(chunks=3, size=100, headers=[])
    status, _, sent = _run(ProxyBodyLimit(forwarding_app, max_bytes=1_000_000), scope, receive)
    assert status == 200 and pulled["n"] == 3  # under the cap: untouched


def test_the_ingress_cap_depends_on_the_content_type():
    async def reading_app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    json_scope, receive, pulled = _client(chunks=100, size=10_000, headers=[(b"content-type", b"Application/JSON")])
    status, body, _ = _run(BodyLimitMiddleware(reading_app), json_scope, receive)
    assert status == 413 and pulled["n"] == 7 and "65536 bytes for a JSON body" in body["error"]["message"]
    form_scope, receive, pulled = _client(chunks=100, size=10_000,
                                          headers=[(b"content-type", b"multipart/form-data; boundary=x")])
    status, _, _ = _run(BodyLimitMiddleware(reading_app), form_scope, receive)
    assert status == 200 and pulled["n"] == 100  # 1 MB is under the image cap
