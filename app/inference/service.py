"""The inference service process: `sae-atlas inference`, one per device.

A small HTTP app on a local port or Unix socket (SAE_ATLAS_INFERENCE_URL) that API processes call
through client.py; it is not meant to face the internet (no keys, no rate limit: the API in
front of it has those). Every endpoint turns its request into a job for the engine thread
(batcher.py) and waits for the answer with the request's deadline; steering streams NDJSON
events while tokens are generated. Errors use the API's one shape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response, StreamingResponse

from app.inference.batcher import Engine, timeout_error
from app.inference.graph_steer import GraphSteerJob
from app.inference.contrastive import contrast, rank
from app.inference.jobs import ActivationsJob, PoolJob, SearchJob
from app.inference.registry import Registry, lookup_saes
from app.inference.schemas import (
    ContrastRequest,
    GraphSteerService,
    SearchRequest,
    ServiceActivations,
    ServiceError,
    SteerRequest,
)
from app.inference.steering import GenerateJob
from store.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _json(content, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def create_service_app(settings: Settings | None = None, db_engine=None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from store.db import make_engine

        if settings.inference_threads:
            import torch

            torch.set_num_threads(settings.inference_threads)
        db = db_engine or make_engine(settings.sqlalchemy_url)
        registry = Registry(db, settings.device, settings.inference_memory_mb)
        app.state.db = db
        app.state.registry = registry
        app.state.engine = Engine(registry, settings.inference_max_tokens, settings.inference_queue_size,
                                  settings.inference_batch_tokens, settings.inference_batch_wait_ms).start()
        log.info("inference service ready on %s (device %s)", settings.inference_url, registry.device)
        yield
        app.state.engine.stop()

    app = FastAPI(title="SAE Atlas inference service", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    timeout = settings.inference_timeout_s

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return _json(exc.body(), exc.status, exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _json(ServiceError(422, "invalid_parameters", f"{where}: {first.get('msg')}" if where else first.get("msg")).body(),
                     422)

    async def run(request: Request, make_job):
        """Submit a job and wait for its answer; the job is cancelled if the wait ends first."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def on_done(result, error):
            def settle():
                if not future.done():
                    future.set_exception(error) if error is not None else future.set_result(result)
            loop.call_soon_threadsafe(settle)

        job = make_job(on_done)
        request.app.state.engine.submit(job)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout + 5)
        except TimeoutError:
            job.cancelled = True
            raise timeout_error() from None
        finally:
            if not future.done():
                job.cancelled = True

    async def metas(request: Request, names=None, model=None):
        """SAEs named in a request body: an unknown one is a bad parameter (422), not a missing page."""
        try:
            return await run_in_threadpool(lookup_saes, request.app.state.db, names, model)
        except ServiceError as exc:
            if exc.status == 404:
                raise ServiceError(422, "invalid_parameters", exc.message) from None
            raise

    @app.get("/v1/status")
    async def status(request: Request):
        reg: Registry = request.app.state.registry
        return _json({"device": str(reg.device), "loaded": reg.describe(), "memory_mb": round(reg.used_bytes() / 2**20, 1),
                      "memory_budget_mb": settings.inference_memory_mb, "engine": request.app.state.engine.status(),
                      "limits": {"max_tokens": settings.inference_max_tokens, "queue_size": settings.inference_queue_size,
                                 "timeout_s": timeout, "contrast_max_texts": settings.inference_contrast_max_texts}})

    @app.post("/v1/activations")
    async def activations(request: Request, body: ServiceActivations):
        (meta,) = await run_in_threadpool(lookup_saes, request.app.state.db, [body.sae])  # a path parameter: 404
        result = await run(request, lambda done: ActivationsJob(meta, body.latents, body.text, body.token_ids, timeout, done))
        return _json({"sae": meta.name, "latents": body.latents, **result})

    @app.post("/v1/search")
    async def search(request: Request, body: SearchRequest):
        found = await metas(request, body.saes, body.model)
        result = await run(request, lambda done: SearchJob(found, body.text, body.positions, body.rank_by, body.density_min,
                                                           body.density_max, body.limit, timeout, done))
        return _json({"model": found[0].lm_name, "saes": [m.name for m in found], **result})

    @app.post("/v1/contrast")
    async def contrastive(request: Request, body: ContrastRequest):
        a = [t for t in body.set_a if t.strip()]
        b = [t for t in body.set_b if t.strip()]
        limit = settings.inference_contrast_max_texts
        for label, texts in (("set_a", a), ("set_b", b)):
            if len(texts) > limit:
                raise ServiceError(422, "invalid_parameters", f"{label} has {len(texts)} texts; the limit is {limit} "
                                                              "(SAE_ATLAS_INFERENCE_CONTRAST_MAX_TEXTS)")
        found = await metas(request, body.saes, body.model)
        started = time.monotonic()
        result = await run(request, lambda done: PoolJob(found, a + b, timeout, done))
        return _json(await run_in_threadpool(_contrast_answer, body, result, len(a), len(b), time.monotonic() - started))

    @app.post("/v1/graphs/steer")
    async def graph_steer(request: Request, body: GraphSteerService):
        return _json(await run(request, lambda done: GraphSteerJob(body, timeout, done)))

    @app.post("/v1/steer")
    async def steer(request: Request, body: SteerRequest):
        names = list(dict.fromkeys(f.sae for f in body.features))
        found = await metas(request, names)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):
            loop.call_soon_threadsafe(events.put_nowait, event)

        def on_done(_result, error):
            if error is not None:
                err = error if isinstance(error, ServiceError) else ServiceError(500, "internal_error", "internal error")
                loop.call_soon_threadsafe(events.put_nowait, {"type": "error", **err.body(), "_status": err.status,
                                                              "_headers": err.headers()})
            loop.call_soon_threadsafe(events.put_nowait, None)

        job = GenerateJob(found, body, timeout, on_done, emit)
        request.app.state.engine.submit(job)
        try:  # the first event says whether the job started; errors before that get their own status
            first = await asyncio.wait_for(events.get(), timeout=timeout + 5)
        except (TimeoutError, asyncio.CancelledError):
            job.cancelled = True
            raise timeout_error() from None
        if first is None or first.get("type") == "error":
            job.cancelled = True
            if first is None:
                raise timeout_error()
            return _json({"error": first["error"]}, first["_status"], first["_headers"])

        async def lines():
            event = first
            try:
                while event is not None:
                    event.pop("_status", None)
                    event.pop("_headers", None)
                    yield orjson.dumps({"model": found[0].lm_name, **event} if event["type"] == "start" else event) + b"\n"
                    if event["type"] in ("done", "error"):
                        return
                    event = await asyncio.wait_for(events.get(), timeout=timeout + 5)
            except TimeoutError:
                yield orjson.dumps({"type": "error", **timeout_error().body()}) + b"\n"
            finally:
                job.cancelled = True  # a client that went away stops its rows; a finished job ignores it

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return app


def _contrast_answer(body: ContrastRequest, result: dict, n_a: int, n_b: int, pool_s: float) -> dict:
    """Statistics over the pooled activations (in a worker thread: the engine keeps running)."""
    started = time.monotonic()
    pooled = result["pooled"]
    a = np.concatenate([m[:n_a] for _, m in pooled], axis=1)
    b = np.concatenate([m[n_a:] for _, m in pooled], axis=1)
    stats = contrast(a, b)
    density = np.concatenate([s.density for s, _ in pooled])
    max_act = np.concatenate([s.max_act for s, _ in pooled])
    allowed = np.ones(len(density), dtype=bool)
    if body.density_min is not None:
        allowed &= density >= body.density_min
    if body.density_max is not None:
        allowed &= density <= body.density_max
    order = rank(stats, body.direction, allowed, body.limit)
    offsets = np.cumsum([0] + [s.meta.d_sae for s, _ in pooled])
    items = []
    for t in order.tolist():
        k = int(np.searchsorted(offsets, t, side="right") - 1)
        s = pooled[k][0]
        items.append({"sae": s.meta.name, "index": t - int(offsets[k]), "auroc": float(stats.auroc[t]),
                      "cohens_d": _finite(stats.cohens_d[t]), "p_value": float(stats.p[t]), "q_value": float(stats.q[t]),
                      "mean_a": float(stats.mean_a[t]), "mean_b": float(stats.mean_b[t]),
                      "density_a": float(stats.density_a[t]), "density_b": float(stats.density_b[t]),
                      "density": float(density[t]), "max_activation": float(max_act[t])})
    return {"model": pooled[0][0].meta.lm_name, "n_a": n_a, "n_b": n_b, "n_tests": stats.n_tests,
            "n_significant": int((stats.q < 0.05).sum()), "truncated_texts": result["truncated"],
            "saes": [{"name": s.meta.name, "version": s.meta.version, "site": s.meta.site, "d_sae": s.meta.d_sae}
                     for s, _ in pooled],
            "items": items, "timings": {"pool_s": round(pool_s, 3), "stats_s": round(time.monotonic() - started, 3)}}


def serve_inference(listen: str | None = None) -> None:
    """Run the service in this process until interrupted (sae-atlas inference)."""
    import uvicorn

    settings = get_settings()
    target = listen or settings.inference_url
    kwargs = _listen_kwargs(target)
    uvicorn.run(create_service_app(settings), log_level=settings.log_level.lower(), access_log=False, workers=1,
                timeout_graceful_shutdown=5, **kwargs)


def _listen_kwargs(target: str) -> dict:
    from app.inference.client import parse_url

    kind, where = parse_url(target)
    if kind == "unix":
        return {"uds": where}
    host, port = where
    return {"host": host, "port": port}
