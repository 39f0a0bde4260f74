"""Request-body limits that hold without a Content-Length (SPEC §5; issue 17 item 3).

An ASGI middleware counts the bytes of every `http.request` message as the app reads them and
stops at the cap: a declared Content-Length over the cap is answered 413 before a byte is read,
and a chunked body that grows past it is cut off there (413), so nothing beyond the cap is
buffered, parsed or spooled to disk. The caps come from the app's state (`api.state.body_limits`,
set by the Ingress from its ServeConfig): images (multipart uploads) and JSON bodies each have one.
"""

from __future__ import annotations

from dataclasses import dataclass

from tagray.serve.errors import RequestError, body

MULTIPART_SLACK = 64 * 1024  # multipart framing and form fields around the image itself


@dataclass(frozen=True)
class BodyLimits:
    image_bytes: int = 10 * 2**20
    json_bytes: int = 64 * 1024

    def for_content_type(self, content_type: str) -> tuple[int, str]:
        """(cap in bytes, what it is) for a request of this content type."""
        if media_type(content_type) == "multipart/form-data":
            return self.image_bytes + MULTIPART_SLACK, f"an image of at most {self.image_bytes} bytes (+ 64 KiB framing)"
        return self.json_bytes, f"{self.json_bytes} bytes for a JSON body"


def media_type(content_type: str) -> str:
    """`Multipart/Form-Data; boundary=x` → `multipart/form-data` (media types are case-insensitive)."""
    return content_type.split(";", 1)[0].strip().lower()


class BodyTooLarge(RequestError):
    def __init__(self, what: str, declared: int | None = None) -> None:
        got = f"a body of {declared} bytes" if declared is not None else "a body that grew past the limit"
        super().__init__(413, f"{got}: the limit is {what}", code="too_large")


class BodyLimitMiddleware:
    """ASGI middleware enforcing BodyLimits while the body streams in."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = getattr(getattr(scope.get("app"), "state", None), "body_limits", None) or BodyLimits()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cap, what = limits.for_content_type(headers.get("content-type", ""))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await _send_json(send, BodyTooLarge(what, int(declared)))
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(what)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as e:  # raised where no handler caught it (a streaming read outside a route)
            if not started:
                await _send_json(send, e)


async def _send_json(send, e: RequestError) -> None:
    import json

    payload = json.dumps(body(e.status, e.message, e.code)).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


# --- the same cap in Serve's HTTP proxy ------------------------------------------------------
# Serve's proxy reads a request's body from the client into a queue while the replica consumes
# it, so a chunked body the Ingress has already refused keeps flowing into the proxy until the
# 413 has travelled back (measured: 88 MiB buffered under load). Serve applies the Starlette
# middlewares that the function named by RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH returns to
# its proxy: `proxy_middlewares` caps every body there too, at TAGRAY_PROXY_MAX_BODY_BYTES
# (default: the default image cap + multipart framing). `tagray.runtime.init_ray` sets the
# variable for the clusters it starts; cluster images and manifests set it themselves.
PROXY_CALLBACK = "tagray.serve.limits:proxy_middlewares"
PROXY_MAX_BODY_ENV = "TAGRAY_PROXY_MAX_BODY_BYTES"


def proxy_max_body_bytes() -> int:
    import os

    value = os.environ.get(PROXY_MAX_BODY_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else BodyLimits().image_bytes + MULTIPART_SLACK


class ProxyBodyLimit:
    """ASGI middleware for Serve's proxy: a declared Content-Length over the cap is answered
    413 at once; a body that grows past it is answered 413 and the app behind (the proxy's
    forwarding to a replica) is told the client went away, so it stops buffering."""

    def __init__(self, app, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or proxy_max_body_bytes()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        what = f"{self.max_bytes} bytes for any request body (the proxy's cap)"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, BodyTooLarge(what, int(declared)))
            return
        received, started, answered = 0, False, False

        async def guarded_send(message) -> None:
            nonlocal started
            if answered:
                return  # this middleware answered already
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def limited_receive():
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        await _send_json(send, BodyTooLarge(what))
                    answered = True
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited_receive, guarded_send)


def proxy_middlewares() -> list:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names: Serve's proxy wraps itself in these."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyBodyLimit)]
