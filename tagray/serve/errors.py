"""One error shape for every answer that is not a success (SPEC §5):
`{"error": {"code": "...", "message": "..."}}` with the HTTP status it maps to.

A client's mistake is a 4xx naming the problem; a dependency that failed (the object store, a
replica that died) is a 502/503/504 saying which; anything else is a 500 whose message carries
an id that the server's log holds with the traceback. Installed on the FastAPI app by
`install(api)`, so FastAPI's own validation errors, unknown routes and wrong methods come back in
the same shape.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

DEFAULT_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "rate_limited", 500: "internal", 502: "bad_gateway", 503: "unavailable", 504: "timeout",
}
MAX_ECHO = 64  # characters of a client's own input quoted back in a message


class RequestError(Exception):
    """An answer other than success: `status` is the HTTP status, `code` a stable word for
    programs, the message says what was wrong for people; `headers` go with it (Retry-After)."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or DEFAULT_CODES.get(status, "error")
        self.headers = headers or {}

    def to_dict(self) -> dict:
        """A picklable form, for answers that travel back through a deployment handle."""
        return {"__request_error__": True, "status": self.status, "message": self.message, "code": self.code,
                "headers": self.headers}

    @classmethod
    def from_dict(cls, d: dict) -> RequestError:
        return cls(d["status"], d["message"], d["code"], d["headers"])


def is_error(result: object) -> bool:
    return isinstance(result, dict) and result.get("__request_error__") is True


def raise_if_error(result):
    """A deployment's answer, or the RequestError it carried back."""
    if is_error(result):
        raise RequestError.from_dict(result)
    return result


def shown(text: str, limit: int = MAX_ECHO) -> str:
    """A client's string, quoted and cut to `limit` characters (never echoed back in full)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"code": code or DEFAULT_CODES.get(status, "error"), "message": message}}


def response(e: RequestError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=body(e.status, e.message, e.code), headers=e.headers)


def _validation_message(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install(api: FastAPI) -> None:
    """Every error the app can raise → the one shape."""

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return response(e)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content=body(422, _validation_message(e)))

    @api.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        message = e.detail if isinstance(e.detail, str) else DEFAULT_CODES.get(e.status_code, "error")
        return JSONResponse(status_code=e.status_code, content=body(e.status_code, message),
                            headers=getattr(e, "headers", None))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        ref = uuid.uuid4().hex[:12]
        log.exception("unexpected error %s on %s %s", ref, request.method, request.url.path)
        return JSONResponse(status_code=500, content=body(500, f"internal error (server log: {ref})"))
