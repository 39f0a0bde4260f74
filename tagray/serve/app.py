"""The Ray Serve application (SPEC §5): an HTTP ingress (FastAPI) in front of a Tagger and a
Searcher deployment. The work itself is in tagray/serve/service.py.

    POST /v1/tag        multipart `file`, or JSON {"uri": "s3://bucket/key"}; ?k=5&threshold=0
    GET  /v1/search     ?q=beach,sunset&k=20
    GET  /v1/tags       the model's vocabulary
    GET  /v1/model      which model answers, its training metrics
    GET  /healthz       200 when the deployments answer
    GET  /docs          OpenAPI

Images are decoded in the Tagger replica (in a thread, before batching); `@serve.batch`
then groups up to `batch_size` decoded images into one backbone + head call. A request's
own mistakes come back as 4xx JSON `{"error": "..."}`, never as a 500. A new model is rolled
out with `user_config` (`serve deploy` with a changed `model`/`index`, or
`serve.run(... user_config=...)`): `reconfigure` loads it while the old one keeps serving.

`serve run serve_configs/tagray.yaml` or `tagray serve --model MODEL [--index INDEX]`.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at runtime.

import asyncio
import dataclasses
import logging

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from tagray.config import from_dict, to_dict
from tagray.serve.service import (
    RequestError,
    SearchService,
    ServeConfig,
    TaggingService,
    fetch_uri,
    resolve,
)

log = logging.getLogger(__name__)

api = FastAPI(title="tagray", description="Image tagging and tag search learned from user tags (SPEC §5).")


@api.exception_handler(RequestError)
async def _request_error(_: Request, e: RequestError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content={"error": e.message})


def _error(e: RequestError) -> dict:
    return {"error": e.message, "status": e.status}


def _raise_if_error(result):
    if isinstance(result, dict) and "error" in result and "status" in result:
        raise RequestError(result["status"], result["error"])
    return result


@serve.deployment(name="Tagger")
class Tagger:
    """Backbone + head; decoded images batched into one model call."""

    def __init__(self, config: dict) -> None:
        self.cfg = from_dict(ServeConfig, config, "serve config")
        self.service: TaggingService | None = None
        self.tag_batch.set_max_batch_size(self.cfg.batch_size)
        self.tag_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_s)

    def reconfigure(self, user_config: dict) -> None:
        """Loads the model named by user_config (first deploy, and every rollout)."""
        model = resolve((user_config or {}).get("model") or self.cfg.model, self.cfg.base_dir)
        if not model:
            raise ValueError("Tagger: no model (user_config.model)")
        if self.service is None or model != self.service.model_dir:
            self.service = TaggingService(model, self.cfg)  # the old one serves until this returns
            log.info("Tagger: serving %s", model)

    @serve.batch
    async def tag_batch(self, requests: list[tuple]) -> list[list[dict]]:
        pixels, ks, thresholds = zip(*requests, strict=True)
        return self.service.tag(list(pixels), list(ks), list(thresholds))

    async def tag(self, data: bytes, k: int, threshold: float) -> list[dict] | dict:
        try:
            pixels = await asyncio.to_thread(self.service.decode, data)
        except RequestError as e:
            return _error(e)
        return await self.tag_batch((pixels, k, threshold))

    def tags(self) -> list[str]:
        return self.service.tags

    def model_info(self) -> dict:
        return self.service.model_info()


@serve.deployment(name="Searcher")
class Searcher:
    def __init__(self, config: dict) -> None:
        self.cfg = from_dict(ServeConfig, config, "serve config")
        self.service: SearchService | None = None
        self.model = self.index_dir = None

    def reconfigure(self, user_config: dict) -> None:
        model = resolve((user_config or {}).get("model") or self.cfg.model, self.cfg.base_dir)
        index = resolve((user_config or {}).get("index") or self.cfg.index or "", self.cfg.base_dir)
        if not model or not index:
            raise ValueError("Searcher: no model or index (user_config.model, user_config.index)")
        if self.service is None or (model, index) != (self.model, self.index_dir):
            self.service = SearchService(model, index, self.cfg)
            self.model, self.index_dir = model, index

    def search(self, q: str, k: int) -> list[dict] | dict:
        try:
            return self.service.search(self.service.terms(q), k)
        except RequestError as e:
            return _error(e)

    def image(self, image_id: str) -> bytes | dict:
        try:
            return self.service.image_bytes(image_id)
        except RequestError as e:
            return _error(e)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, tagger, searcher, config: dict) -> None:
        self.tagger, self.searcher = tagger, searcher
        self.cfg = from_dict(ServeConfig, config, "serve config")

    @api.post("/v1/tag")
    async def tag(self, request: Request, k: int = Query(5, ge=1), threshold: float = Query(0.0, ge=0.0, le=1.0)) -> dict:
        """Tags of one image: multipart field `file`, or JSON {"uri": "s3://bucket/key"}."""
        if k > self.cfg.max_k:
            raise RequestError(422, f"k must be in [1, {self.cfg.max_k}], got {k}")
        data = await self._image_bytes(request)
        tags = _raise_if_error(await self.tagger.tag.remote(data, k, threshold))
        return {"tags": tags, "k": k, "threshold": threshold}

    async def _image_bytes(self, request: Request) -> bytes:
        limit = self.cfg.max_image_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:  # room for multipart framing
            raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} (+ 64 KiB)")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(400, "multipart request without a `file` field holding the image")
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise RequestError(413, f"image over the limit of {limit} bytes")
            return data
        if kind.startswith("application/json"):
            body = await request.body()
            if len(body) > 64 * 1024:
                raise RequestError(413, "JSON body over 64 KiB")
            try:
                payload = await request.json()
            except ValueError:
                raise RequestError(400, "body is not valid JSON") from None
            uri = payload.get("uri") if isinstance(payload, dict) else None
            return await asyncio.to_thread(fetch_uri, uri, self.cfg)
        raise RequestError(400, f"unsupported content type {kind or '(none)'!r}: send multipart/form-data with a "
                                '`file` field, or JSON {"uri": "s3://bucket/key"}')

    @api.get("/v1/search")
    async def search(self, q: str = Query("", description="comma-separated tags"), k: int = Query(20)) -> dict:
        if self.searcher is None:
            raise RequestError(404, "search is not configured (no index): start with --index INDEX")
        images = _raise_if_error(await self.searcher.search.remote(q, k))
        return {"query": q, "images": images}

    @api.get("/v1/images/{image_id}", include_in_schema=False)
    async def image(self, image_id: str) -> Response:
        """An indexed image's bytes (thumbnails of the page); only images the index lists."""
        if self.searcher is None:
            raise RequestError(404, "no index configured")
        data = _raise_if_error(await self.searcher.image.remote(image_id))
        return Response(content=data, media_type="image/jpeg")

    @api.get("/v1/tags")
    async def tags(self) -> dict:
        return {"tags": await self.tagger.tags.remote()}

    @api.get("/v1/model")
    async def model(self) -> dict:
        return await self.tagger.model_info.remote()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await self.tagger.model_info.remote()
        return {"status": "ok", "model": info["model"], "search": self.searcher is not None}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        from tagray.serve.page import PAGE

        return PAGE


def build_app(args: dict) -> serve.Application:
    """The application from a flat dict of ServeConfig fields (the `args` of a Serve config)."""
    import os

    cfg = from_dict(ServeConfig, dict(args), "serve args")
    base = cfg.base_dir or os.getcwd()
    cfg = dataclasses.replace(cfg, base_dir=base, model=resolve(cfg.model, base),
                              index=resolve(cfg.index, base) if cfg.index else None)
    # Constructors get the settings without model/index; those travel as user_config, so
    # changing them (serve deploy, or build_app + serve.run again) reconfigures the running
    # replicas in place: a rollout without downtime.
    config = to_dict(dataclasses.replace(cfg, model="", index=None))
    tagger = Tagger.options(
        num_replicas=cfg.tagger_replicas,
        ray_actor_options={"num_cpus": cfg.tagger_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=max(4 * cfg.batch_size, 32),
        user_config={"model": cfg.model},
    ).bind(config)
    searcher = None
    if cfg.index:
        searcher = Searcher.options(num_replicas=cfg.searcher_replicas, ray_actor_options={"num_cpus": 0.25},
                                    user_config={"model": cfg.model, "index": cfg.index}).bind(config)
    return Ingress.options(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256).bind(tagger, searcher, config)


def serve_config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ServeConfig)]
