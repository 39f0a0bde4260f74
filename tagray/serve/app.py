"""The Ray Serve application (SPEC §5): an HTTP ingress (FastAPI) in front of a Tagger and a
Searcher deployment. The work itself is in tagray/serve/service.py.

    POST /v1/tag        multipart `file`, or JSON {"uri": "s3://bucket/key"}; ?k=5&threshold=0
    GET  /v1/search     ?q=beach,sunset&k=20&offset=0&min_score=0.1&user=…&taken_after=2024-01-01&taken_before=…
    POST /v1/similar    multipart `file` (an example image), or JSON {"image_id": "…", "k": 20}; the same
                        query parameters (k, offset, min_score, filters)
    GET  /v1/tags       the model's vocabulary
    GET  /v1/model      which model answers, its training metrics
    GET  /healthz       200 when the deployments answer
    GET  /docs          OpenAPI

Images are decoded in the Tagger replica (in a thread, before batching); `@serve.batch`
then groups up to `batch_size` decoded images into one backbone + head call. Requests are
typed (pydantic models below); bodies are capped while they stream in (serve/limits.py); every
error has one shape, `{"error": {"code", "message"}}` (serve/errors.py): 4xx for a request's own
mistakes, 502/503/504 for a store or replica that failed (a dead replica is retried once). A new model is rolled
out with `user_config` (`serve deploy` with a changed `model`/`index`, or
`serve.run(... user_config=...)`): `reconfigure` loads it while the old one keeps serving.

Search is sharded (issue 15): the index's shards are split round robin over `search_groups`
deployments `Searcher-0..G-1`, each told its group number through `user_config`. A new index version
(`tagray index --append/--delete/--compact`) is picked up by every replica within `index_refresh_s`
(serve/refresh.py: loaded beside the old version, then swapped; no redeploy, no downtime, and
appended shards join the existing groups round robin). The Ingress fans a query out to every group at once,
each answers its best offset + k hits, and `tagray.index.merge_hits` merges them by (−score, row):
exactly the unsharded answer. A group that fails or does not answer within `search_timeout_s` is
left out (and skipped for `group_retry_s`) while Serve replaces it: the answer is then 200 with
`"partial": true` and the `missing_shards`, never a 5xx (503 only when no group answered).

`serve run serve_configs/tagray.yaml` or `tagray serve --model MODEL [--index INDEX]`.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at runtime.

import asyncio
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from tagray.config import from_dict, to_dict
from tagray.data import storage
from tagray.index import open_index, shard_groups
from tagray.serve import errors
from tagray.serve.auth import HeldKey, KeyRing, parse_entries, split_env
from tagray.serve.errors import RequestError, is_error, raise_if_error
from tagray.serve.limits import BodyLimitMiddleware, BodyLimits, media_type
from tagray.serve.refresh import IndexRefresh
from tagray.serve.service import (
    SearchService,
    ServeConfig,
    TaggingService,
    fetch_uri,
    resolve,
)

log = logging.getLogger(__name__)

api = FastAPI(title="tagray", description="Image tagging and tag search learned from user tags (SPEC §5).")
api.add_middleware(BodyLimitMiddleware)
errors.install(api)


class TagParams(BaseModel):
    """Query of POST /v1/tag."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(5, ge=1, description="how many tags (at most the server's max_k)")
    threshold: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="smallest P(z) returned")


class TagByUri(BaseModel):
    """JSON body of POST /v1/tag: an object in one of the configured buckets."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(min_length=1, max_length=2048, description="s3://bucket/key")


class VerdictIn(BaseModel):
    """One user's verdict on a suggested tag: of an indexed image, or of an upload (by the
    `upload_sha256` POST /v1/tag answered with)."""

    model_config = ConfigDict(extra="forbid")
    image_id: str | None = Field(None, min_length=1, max_length=512)
    upload_sha256: str | None = Field(None, min_length=64, max_length=64)
    tag: str = Field(min_length=1, max_length=256)
    verdict: Literal["present", "absent"]


class FeedbackIn(BaseModel):
    """Body of POST /v1/feedback. `request_id`: the client's idempotency key — re-sending a
    request (say after a timeout) with the same id stores nothing twice."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=128)
    verdicts: list[VerdictIn] = Field(min_length=1, max_length=1000)


class PageParams(BaseModel):
    """Paging, cut-off and filters, shared by GET /v1/search and POST /v1/similar."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(20, ge=1, description="how many images (at most the server's max_k)")
    offset: int = Field(0, ge=0, description="skip this many of the best images (paging; at most the server's "
                                             "max_offset); an answer's next_offset is the next page's")
    min_score: float | None = Field(None, allow_inf_nan=False, description=(
        "smallest score returned. Linear heads: the product of the query tags' calibrated P(z=1|x), a "
        "probability that the image shows every tag (seed 001 §5.3) — 0.5 means the same for any query. "
        "Embed head: f·q, the sum of the words' logits. Search by example: the similarity of the index"))
    user: str | None = Field(None, min_length=1, max_length=256, description="only this user's images")
    taken_after: str | None = Field(None, max_length=40, description="only images taken on/after (ISO date)")
    taken_before: str | None = Field(None, max_length=40, description="only images taken on/before (ISO date)")

    def filters(self) -> dict:
        return {"user": self.user, "taken_after": self.taken_after, "taken_before": self.taken_before}


class SearchParams(PageParams):
    """Query of GET /v1/search."""

    q: str = Field("", max_length=1024, description="comma-separated tags (or words, for an embed model)")


class SimilarIn(BaseModel):
    """JSON body of POST /v1/similar: the images nearest an indexed one (the image itself left out)."""

    model_config = ConfigDict(extra="forbid")
    image_id: str = Field(min_length=1, max_length=512)
    k: int | None = Field(None, ge=1, description="overrides the query's k")


def _parse_json(model: type[BaseModel], body: bytes) -> BaseModel:
    """A JSON body validated by pydantic's parser (which bounds nesting: `[`×50000 is an error,
    not a RecursionError): not JSON → 400, JSON of the wrong shape → 422."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            raise RequestError(400, f"body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                               code="invalid_json") from None
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise RequestError(422, f"{where}: {first['msg']}") from None


def _scope(scope: str):
    """A route's API-key check (tagray/serve/auth.py), run before the route reads its body;
    the key it found (None when the app holds no keys)."""

    async def check(request: Request) -> HeldKey | None:
        ring = getattr(request.app.state, "keyring", None)
        return ring.authorize(request.headers.get("authorization"), scope) if ring is not None else None

    return Depends(check)


READ = [_scope("read")]
WRITER = _scope("write")


def keyring_of(cfg: ServeConfig) -> KeyRing:
    """The keys of the config and of its environment variable (read in the replica's process)."""
    env = os.environ.get(cfg.api_keys_env, "")
    keys = parse_entries(cfg.api_keys, "api_keys") + parse_entries(split_env(env), f"${cfg.api_keys_env}")
    if not keys and cfg.require_api_keys:
        raise ValueError(f"require_api_keys is set but no key entries were found in api_keys or ${cfg.api_keys_env}")
    if not keys:
        log.warning("serve: no API keys configured: every endpoint is open (set api_keys or $%s)", cfg.api_keys_env)
    return KeyRing(keys, cfg.rate_limit_per_s, cfg.rate_limit_burst)


# A replica that dies under a request (or is being replaced) is retried once on another one;
# when that fails too the answer is 503 with Retry-After, never a plain-text 500.
_REPLICA_GONE: tuple[type[BaseException], ...] = ()


def _replica_errors() -> tuple[type[BaseException], ...]:
    global _REPLICA_GONE
    if not _REPLICA_GONE:
        import ray.exceptions as rex

        found = [rex.RayActorError]
        for name in ("ActorUnavailableError", "ActorDiedError"):
            if hasattr(rex, name):
                found.append(getattr(rex, name))
        try:
            from ray.serve.exceptions import BackPressureError

            found.append(BackPressureError)
        except ImportError:  # older Serve
            pass
        _REPLICA_GONE = tuple(found)
    return _REPLICA_GONE


def settle_gc() -> int:
    """Collects, then moves every object alive now (the imports, the loaded model or index) into
    the collector's permanent generation (`gc.freeze`), so that full collections stop traversing a
    replica's ~300k start-up objects: one took ~160 ms in a Serve replica's process on this VM, a
    request's tail (benchmarks/gc_pause.py). Objects made later are collected as usual; each call
    first unfreezes, so what an earlier freeze kept and is now garbage goes too. Returns the
    objects frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def call(handle_method, what: str, *args):
    """`await handle_method.remote(*args)`, retried once if the replica died; its RequestError raised."""
    for attempt in (1, 2):
        try:
            return raise_if_error(await handle_method.remote(*args))
        except _replica_errors() as e:
            log.warning("%s replica unavailable (attempt %d): %s", what, attempt, type(e).__name__)
    raise RequestError(503, f"the {what} replica is unavailable (being replaced); retry shortly",
                       code="replica_unavailable", headers={"Retry-After": "2"})


@serve.deployment(name="Tagger")
class Tagger:
    """Backbone + head; decoded images batched into one model call."""

    def __init__(self, config: dict) -> None:
        self.cfg = from_dict(ServeConfig, config, "serve config")
        self.service: TaggingService | None = None
        self.batch_sizes: dict[int, int] = {}
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
            settle_gc()

    @serve.batch
    async def tag_batch(self, requests: list[tuple]) -> list[list[dict]]:
        pixels, ks, thresholds = zip(*requests, strict=True)
        self.batch_sizes[len(requests)] = self.batch_sizes.get(len(requests), 0) + 1
        # on the replica's loop: moving the model call to a thread (to overlap it with receiving
        # the next requests) measured slower on 2 cores, 0.67 against 0.78 of the model-bound
        # ceiling at concurrency 16 (BENCHMARKS.md, Serving)
        return self.service.tag(list(pixels), list(ks), list(thresholds))

    def batching(self) -> dict[int, int]:
        """How many model calls took each batch size, since the replica started (benchmarks read
        it through a handle: the images per call is what batching buys)."""
        return dict(self.batch_sizes)

    async def tag(self, data: bytes, k: int, threshold: float) -> list[dict] | dict:
        try:
            pixels = await asyncio.to_thread(self.service.decode, data)
        except RequestError as e:
            return e.to_dict()
        return await self.tag_batch((pixels, k, threshold))

    async def embed(self, data: bytes):
        """An upload → its vector in the index's space (POST /v1/similar), or the RequestError."""
        try:
            pixels = await asyncio.to_thread(self.service.decode, data)
        except RequestError as e:
            return e.to_dict()
        return (await asyncio.to_thread(self.service.query_vectors, [pixels]))[0]

    def tags(self) -> list[str]:
        return self.service.tags

    def model_info(self) -> dict:
        return self.service.model_info()


@serve.deployment(name="Searcher")
class Searcher:
    """One search group: group `group` of `groups` (user_config `{"model", "index", "group", "groups"}`)
    holds shards group, group + groups, … of the index (`shard_groups`), answering each query's best
    hits over them (tagray/serve/service.py SearchService); the Ingress merges the groups. A newer
    index version (an append, delete or compact) is picked up by the replica itself within
    `index_refresh_s` (tagray/serve/refresh.py): loaded beside the old one, then swapped in."""

    def __init__(self, config: dict) -> None:
        self.cfg = from_dict(ServeConfig, config, "serve config")
        self.service: SearchService | None = None
        self.loaded: tuple | None = None
        self.refresh: IndexRefresh | None = None

    def reconfigure(self, user_config: dict) -> None:
        user_config = user_config or {}
        model = resolve(user_config.get("model") or self.cfg.model, self.cfg.base_dir)
        index = resolve(user_config.get("index") or self.cfg.index or "", self.cfg.base_dir)
        if not model or not index:
            raise ValueError("Searcher: no model or index (user_config.model, user_config.index)")
        wanted = (model, index, int(user_config.get("group", 0)), int(user_config.get("groups", 1)))
        if self.service is None or wanted != self.loaded:
            self.loaded = wanted
            self._load(open_index(index, self.cfg.endpoint_url))
            self.refresh = IndexRefresh(index, self.cfg.endpoint_url, self.cfg.index_refresh_s,
                                        lambda: self.service.version, self._load)
            settle_gc()

    def _load(self, info) -> None:
        """This group's shards of `info` (one index version), built beside the service answering now."""
        model, index, group, groups = self.loaded
        parts = shard_groups(list(info.shards), groups)
        shards = parts[group] if group < len(parts) else []
        head = self.service.head if self.service is not None and self.service.model_dir == model else None
        self.service = SearchService(model, index, self.cfg, head=head, shards=shards, info=info)
        log.info("Searcher %d/%d: %d shards of %s (version %d)", group, groups, len(shards),
                 storage.redact(index), info.version)

    def _current(self) -> SearchService:
        self.refresh.poke()
        return self.service

    def search(self, q: str, n: int, min_score: float | None, filters: dict) -> dict:
        svc = self._current()  # one version for the whole request, even if a refresh swaps it meanwhile
        try:
            return _answer(svc, svc.hits(svc.terms(q), n, min_score, _filters(svc, filters)))
        except RequestError as e:
            return e.to_dict()

    def similar(self, vector, n: int, min_score: float | None, filters: dict, exclude: str | None) -> dict:
        svc = self._current()
        try:
            return _answer(svc, svc.similar_hits(vector, n, min_score, _filters(svc, filters), exclude))
        except RequestError as e:
            return e.to_dict()

    def vector_of(self, image_id: str) -> dict:
        svc = self._current()
        try:
            return {"vector": svc.vector_of(image_id), "shards": svc.shards}
        except RequestError as e:
            return e.to_dict()

    def image(self, image_id: str) -> bytes | dict:
        try:
            return self._current().image_bytes(image_id)
        except RequestError as e:
            return e.to_dict()

    def describe(self) -> dict:
        return self._current().describe()


def _answer(svc: SearchService, hits: list) -> dict:
    return {"hits": hits, "shards": svc.shards, "version": svc.version}


def _filters(svc: SearchService, filters: dict):
    from tagray.serve.service import parse_filters

    info = svc.info
    return parse_filters(list(info.columns), **filters, date_column=info.meta.get("date_column"))


@serve.deployment(name="Feedback")
class Feedback:
    """Users' verdicts into the feedback store (tagray/serve/feedback.py); one replica per store."""

    def __init__(self, config: dict) -> None:
        self.cfg = from_dict(ServeConfig, config, "serve config")
        self.service = None
        self.loaded: tuple | None = None

    def reconfigure(self, user_config: dict) -> None:
        from tagray.serve.feedback import FeedbackService

        model = resolve((user_config or {}).get("model") or self.cfg.model, self.cfg.base_dir)
        index = (user_config or {}).get("index") or self.cfg.index
        index = resolve(index, self.cfg.base_dir) if index else None
        if self.service is None or (model, index) != self.loaded:
            self.service = FeedbackService(model, index, self.cfg.feedback, self.cfg.base_dir, self.cfg.endpoint_url)
            self.loaded = (model, index)

    def submit(self, request_id: str, items: list[dict], user: str) -> dict:
        try:
            return self.service.submit(request_id, items, user)
        except RequestError as e:
            return e.to_dict()

    def stats(self) -> dict:
        return self.service.stats()


async def _awaited(response):
    return await response


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, tagger, searchers: list, feedback, config: dict) -> None:
        self.tagger, self.searchers, self.feedback = tagger, list(searchers), feedback
        self.cfg = from_dict(ServeConfig, config, "serve config")
        api.state.body_limits = BodyLimits(self.cfg.max_image_bytes, self.cfg.max_json_bytes)
        api.state.keyring = keyring_of(self.cfg)
        self.index: dict | None = None  # {"uri", "version", "kind", "groups": [[shard names] per group]}
        self.refresh: IndexRefresh | None = None
        self.down_until = [0.0] * len(self.searchers)

    def reconfigure(self, user_config: dict) -> None:
        """The index's version and the shards of each search group; a newer version (an append,
        delete, compact) is then read within index_refresh_s, as the groups themselves do."""
        self.index = (user_config or {}).get("index")
        if self.index is not None:
            self.refresh = IndexRefresh(self.index["uri"], self.cfg.endpoint_url, self.cfg.index_refresh_s,
                                        lambda: self.index["version"], self._index_changed)
        settle_gc()

    def _index_changed(self, info) -> None:
        self.index = {"uri": self.index["uri"], "version": int(info.version), "kind": info.kind,
                      "groups": shard_groups(list(info.shards), len(self.searchers))}

    async def fan_out(self, method: str, *args) -> tuple[list[dict], list[str]]:
        """`method(*args)` on every search group at once → (the groups' answers, the shards missing
        from them). A group that failed, or has not answered within search_timeout_s, is left out
        and skipped for group_retry_s (Serve is replacing it); a 4xx of any group is raised."""
        if not self.searchers:
            raise RequestError(503, "search is not available: this app was started without an index (build one "
                                    "with `tagray index`, then start with --index INDEX)", code="no_index")
        if self.refresh is not None:
            self.refresh.poke()
        now = time.monotonic()
        tasks = {g: asyncio.ensure_future(_awaited(getattr(h, method).remote(*args)))
                 for g, h in enumerate(self.searchers) if self.down_until[g] <= now}
        done, pending = await asyncio.wait(tasks.values(), timeout=self.cfg.search_timeout_s) if tasks else ((), ())
        answers, failed = [], []
        for g, task in tasks.items():
            if task in pending:
                task.cancel()
                failed.append((g, "no answer in time"))
            elif task.exception() is not None:
                failed.append((g, type(task.exception()).__name__))
            elif is_error(task.result()):
                raise_if_error(task.result())
            else:
                answers.append(task.result())
        for g, why in failed:
            log.warning("search group %d left out of an answer: %s", g, why)
            self.down_until[g] = time.monotonic() + self.cfg.group_retry_s
        expected = {s for group in (self.index or {}).get("groups", []) for s in group}
        answered = {s for a in answers for s in a["shards"]}
        if not answers:
            raise RequestError(503, "no search group answered (replicas being replaced); retry shortly",
                               code="replica_unavailable", headers={"Retry-After": "2"})
        return answers, sorted(expected - answered)

    async def _ranked(self, method: str, params: PageParams, *args) -> dict:
        from tagray.index import merge_hits

        if params.k > self.cfg.max_k:
            raise RequestError(422, f"k must be in [1, {self.cfg.max_k}], got {params.k}")
        if params.offset > self.cfg.max_offset:
            raise RequestError(422, f"offset must be in [0, {self.cfg.max_offset}], got {params.offset}")
        answers, missing = await self.fan_out(method, *args[:1], params.offset + params.k, params.min_score,
                                              params.filters(), *args[1:])
        hits = merge_hits([a["hits"] for a in answers], params.k, params.offset)
        more = len(hits) == params.k and params.offset + params.k <= self.cfg.max_offset
        return {"images": [{"image_id": h.image_id, "uri": h.uri, "score": float(h.score)} for h in hits],
                "k": params.k, "offset": params.offset, "next_offset": params.offset + params.k if more else None,
                "min_score": params.min_score, "partial": bool(missing), "missing_shards": missing,
                "index_version": max(a["version"] for a in answers)}

    @api.post("/v1/tag", dependencies=READ)
    async def tag(self, request: Request, params: Annotated[TagParams, Query()]) -> dict:
        """Tags of one image: multipart field `file`, or JSON {"uri": "s3://bucket/key"}."""
        if params.k > self.cfg.max_k:
            raise RequestError(422, f"k must be in [1, {self.cfg.max_k}], got {params.k}")
        data = await self._image_bytes(request)
        tags = await call(self.tagger.tag, "Tagger", data, params.k, params.threshold)
        # the image's digest names it in POST /v1/feedback (upload_sha256)
        return {"tags": tags, "k": params.k, "threshold": params.threshold,
                "upload_sha256": hashlib.sha256(data).hexdigest()}

    async def _image_bytes(self, request: Request) -> bytes:
        """The upload, or the object a JSON body names; the body's size is capped while it
        streams in (tagray/serve/limits.py), so neither is read past its limit."""
        limit = self.cfg.max_image_bytes
        kind = media_type(request.headers.get("content-type", ""))
        if kind == "multipart/form-data":
            async with request.form(max_files=1, max_fields=8) as form:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise RequestError(400, "multipart request without a `file` field holding the image",
                                       code="no_file")
                data = await upload.read(limit + 1)
            if len(data) > limit:
                raise RequestError(413, f"image over the limit of {limit} bytes")
            return data
        if kind == "application/json":
            payload = _parse_json(TagByUri, await request.body())
            return await asyncio.to_thread(fetch_uri, payload.uri, self.cfg)
        raise RequestError(415, f"unsupported content type {errors.shown(kind or '(none)')}: send "
                                'multipart/form-data with a `file` field, or JSON {"uri": "s3://bucket/key"}')

    @api.get("/v1/search", dependencies=READ)
    async def search(self, params: Annotated[SearchParams, Query()]) -> dict:
        """Images showing all the query's tags, best first (see PageParams for min_score, paging, filters)."""
        return {"query": params.q, **await self._ranked("search", params, params.q)}

    @api.post("/v1/similar", dependencies=READ)
    async def similar(self, request: Request, params: Annotated[PageParams, Query()]) -> dict:
        """Search by example: the indexed images nearest an upload (multipart `file`, featurized by
        the Tagger's backbone; 409 `no_backbone` for a model of external features) or an indexed
        image (JSON {"image_id", "k"}; it is left out of its own answer)."""
        kind = media_type(request.headers.get("content-type", ""))
        if kind == "application/json":
            body = _parse_json(SimilarIn, await request.body())
            if body.k is not None:
                params = params.model_copy(update={"k": body.k})
            found, missing = await self.fan_out("vector_of", body.image_id)
            vector = next((a["vector"] for a in found if a["vector"] is not None), None)
            if vector is None:
                if missing:
                    raise RequestError(503, f"image {errors.shown(body.image_id)} is not in the shards that answered; "
                                            f"shards {', '.join(missing)} are being replaced: retry shortly",
                                       code="replica_unavailable", headers={"Retry-After": "2"})
                raise RequestError(404, f"image {errors.shown(body.image_id)} is not in the index", code="unknown_image")
            return {"image_id": body.image_id, **await self._ranked("similar", params, vector, body.image_id)}
        if kind == "multipart/form-data":
            if not self.searchers:
                await self.fan_out("describe")  # the 503 no_index
            data = await self._image_bytes(request)
            vector = await call(self.tagger.embed, "Tagger", data)
            return {"upload_sha256": hashlib.sha256(data).hexdigest(),
                    **await self._ranked("similar", params, vector, None)}
        raise RequestError(415, f"unsupported content type {errors.shown(kind or '(none)')}: send multipart/form-data "
                                'with a `file` field, or JSON {"image_id": "…"}')

    @api.get("/v1/images/{image_id}", include_in_schema=False, dependencies=READ)
    async def image(self, image_id: str) -> Response:
        """An indexed image's bytes (thumbnails of the page); only images the index lists."""
        data = await self._image_of(image_id)
        return Response(content=data, media_type="image/jpeg", headers={"X-Content-Type-Options": "nosniff"})

    async def _image_of(self, image_id: str) -> bytes:
        """The bytes from the group holding the image (the others answer 404)."""
        if not self.searchers:
            await self.fan_out("describe")  # the 503 no_index
        results = await asyncio.gather(*(_awaited(h.image.remote(image_id)) for h in self.searchers),
                                       return_exceptions=True)
        found = [r for r in results if isinstance(r, bytes)]
        if found:
            return found[0]
        other = [r for r in results if is_error(r) and r["status"] != 404]
        if other:
            raise_if_error(other[0])
        if any(isinstance(r, BaseException) for r in results):
            raise RequestError(503, "a search group is being replaced; retry shortly", code="replica_unavailable",
                               headers={"Retry-After": "2"})
        raise RequestError(404, f"image {errors.shown(image_id)} is not in the index (or has no uri)")

    def _feedback(self):
        if self.feedback is None:
            raise RequestError(503, "feedback is not collected by this app: start it with --feedback "
                                    "sqlite:///PATH (the Serve config's `feedback`)", code="no_feedback")
        return self.feedback

    @api.post("/v1/feedback")
    async def post_feedback(self, request: Request, key: Annotated[HeldKey | None, WRITER]) -> dict:
        """Users' verdicts on suggested tags, stored before this answers (needs the write scope)."""
        feedback = self._feedback()
        if media_type(request.headers.get("content-type", "")) != "application/json":
            raise RequestError(415, 'send JSON: {"request_id": "…", "verdicts": [{"image_id", "tag", "verdict"}]}')
        body = _parse_json(FeedbackIn, await request.body())
        items = [v.model_dump() for v in body.verdicts]
        return await call(feedback.submit, "Feedback", body.request_id, items, key.label if key else "anonymous")

    @api.get("/v1/feedback/stats", dependencies=READ)
    async def feedback_stats(self) -> dict:
        return await call(self._feedback().stats, "Feedback")

    @api.get("/v1/tags", dependencies=READ)
    async def tags(self) -> dict:
        return {"tags": await call(self.tagger.tags, "Tagger")}

    @api.get("/v1/model", dependencies=READ)
    async def model(self) -> dict:
        info = await call(self.tagger.model_info, "Tagger")
        index = None
        if self.refresh is not None:
            self.refresh.poke()
        if self.index is not None:
            groups = self.index["groups"]
            index = {"version": self.index["version"], "kind": self.index["kind"],
                     "shards": sum(len(g) for g in groups), "groups": len(groups)}
        return {**info, "search": bool(self.searchers), "feedback": self.feedback is not None, "index": index}

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await call(self.tagger.model_info, "Tagger")
        return {"status": "ok", "model": info["model"], "search": bool(self.searchers)}

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        from tagray.serve.page import CSP, PAGE

        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer"})


def build_app(args: dict) -> serve.Application:
    """The application from a flat dict of ServeConfig fields (the `args` of a Serve config)."""
    import os

    cfg = from_dict(ServeConfig, dict(args), "serve args")
    if not cfg.model:
        from tagray.config import ConfigError

        raise ConfigError("serve args: no model (give model: DIR)")
    base = cfg.base_dir or os.getcwd()
    cfg = dataclasses.replace(cfg, base_dir=base, model=resolve(cfg.model, base),
                              index=resolve(cfg.index, base) if cfg.index else None)
    # Constructors get the settings without model/index; those travel as user_config, and every
    # deployment's code version is a digest of its constructor's inputs and tagray's serving code
    # (`_versioned`), so changing only the model or index (serve.run(build_app(...)) again) is a
    # reconfigure of the running replicas — the old model or index serves until the new one has
    # loaded — and changed settings or code replace them.
    config = to_dict(dataclasses.replace(cfg, model="", index=None))
    lifecycle = {"health_check_period_s": cfg.health_check_period_s, "health_check_timeout_s": cfg.health_check_timeout_s,
                 "graceful_shutdown_wait_loop_s": cfg.graceful_shutdown_wait_loop_s}
    tagger_config, searcher_config, feedback_config = (view(config, d) for d in ("Tagger", "Searcher", "Feedback"))
    tagger = _versioned(Tagger.options(
        num_replicas=cfg.tagger_replicas,
        ray_actor_options={"num_cpus": cfg.tagger_cpus, "num_gpus": cfg.num_gpus},
        max_ongoing_requests=max(4 * cfg.batch_size, 32),
        user_config={"model": cfg.model}, **lifecycle,
    ), tagger_config).bind(tagger_config)
    searchers, index = [], None
    if cfg.index:
        info = open_index(cfg.index, cfg.endpoint_url)
        groups = shard_groups(list(info.shards), cfg.search_groups)
        searchers = [_versioned(Searcher.options(name=f"Searcher-{g}", num_replicas=cfg.searcher_replicas,
                                                 ray_actor_options={"num_cpus": cfg.searcher_cpus},
                                                 user_config={"model": cfg.model, "index": cfg.index, "group": g,
                                                              "groups": len(groups)}, **lifecycle),
                                 searcher_config).bind(searcher_config)
                     for g in range(len(groups))]
        index = {"uri": cfg.index, "version": int(info.version), "kind": info.kind, "groups": groups}
    feedback = None
    if cfg.feedback:  # one replica: SQLite takes one writer (Serve replaces it when it dies)
        feedback = _versioned(Feedback.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1},
                                               user_config={"model": cfg.model, "index": cfg.index}, **lifecycle),
                              feedback_config).bind(feedback_config)
    ingress = Ingress.options(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256,
                              user_config={"index": index}, **lifecycle)
    # the Ingress holds a handle per search group: a different number of groups is a new Ingress
    return _versioned(ingress, config, groups=len(searchers), feedback=feedback is not None).bind(
        tagger, searchers, feedback, config)


# The ServeConfig fields each deployment's replicas read (their constructors, reconfigure and the
# services they hold). A deployment is given only these — the others at their defaults — and its code
# version digests only these, so a changed setting replaces only the replicas that read it: new API
# keys or search groups restart the Ingress (and the groups), not the Tagger with its backbone on a
# GPU. The Ingress reads the whole config. (tests/test_serve_views.py runs each deployment's code
# with a config that records what is read, and fails on a field missing here.)
READS: dict[str, tuple[str, ...]] = {
    "Tagger": ("base_dir", "endpoint_url", "weights", "max_image_bytes", "max_pixels", "batch_size",
               "batch_wait_s", "torch_threads", "num_gpus"),
    "Searcher": ("base_dir", "endpoint_url", "max_image_bytes", "max_query_terms", "max_k", "max_offset",
                 "searcher_cpus", "search_threads", "scan_codes", "index_refresh_s"),
    "Feedback": ("base_dir", "endpoint_url", "feedback"),
}


def view(config: dict, deployment: str) -> dict:
    """`config` (every ServeConfig field, as a dict) as `deployment` is given it: only the fields it
    reads (READS)."""
    return {name: config[name] for name in READS[deployment]}


def _versioned(deployment: serve.Deployment, config: dict, **more) -> serve.Deployment:
    """`deployment` with a code version that changes exactly when its replicas must restart: its
    name, its constructor's settings (`config`, `more`) and the source of tagray's serving code.
    Serve then reconfigures replicas whose user_config alone changed (a model or index rollout)
    instead of replacing them, under serve.run as under `serve deploy`. (Serve's public options
    no longer take a version; `_internal` sets only this one, the others stay user-configured.)"""
    blob = json.dumps({"name": deployment.name, "config": config, "more": more, "code": _serving_code_digest()},
                      sort_keys=True, default=str)
    return deployment.options(version=hashlib.sha256(blob.encode()).hexdigest()[:16], _internal=True)


@functools.cache
def _serving_code_digest() -> str:
    """A digest of tagray's source (every module a replica may run): a new version or a local edit
    replaces the replicas at the next deploy."""
    digest = hashlib.sha256()
    root = Path(__file__).parent.parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def serve_config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ServeConfig)]
