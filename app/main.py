"""The FastAPI application: JSON API under /api/v1, HTML pages, static files, security headers."""

from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine

from app import __version__
from app.api import api_router
from app.api.errors import install_error_handlers
from store.db import check_schema, make_engine, session_factory
from app.middleware import BodyLimit
from store.paths import resource_dir
from store.settings import Settings, get_settings
from app.web.live_pages import router as live_pages_router
from app.web.rendering import html_error
from app.web.compare_pages import router as compare_pages_router
from app.web.lineage_pages import router as lineage_pages_router
from app.web.pages import router as pages_router
from app.web.graph_pages import router as graph_pages_router
from app.web.run_pages import router as run_pages_router
from app.web.structure_pages import router as structure_pages_router

log = logging.getLogger(__name__)


def content_security_policy(settings: Settings) -> str:
    """Scripts from this server and the one pinned htmx file (its exact URL, not its CDN's whole
    origin: anything else on unpkg would be allowed otherwise)."""
    parts = urlsplit(settings.htmx_url)
    script = settings.htmx_url if parts.scheme in ("http", "https") and parts.netloc else ""
    for bad in (" ", ";", ",", "'"):
        script = script.replace(bad, "")  # one source expression, whatever the setting holds
    return ("default-src 'self'; "
            f"script-src 'self' {script}; "
            "style-src 'self'; img-src 'self' data:; font-src 'self'; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


# Swagger UI at /docs loads its own assets from a CDN and runs an inline script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
            "object-src 'none'; frame-ancestors 'none'")


class SecurityHeaders:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path): adds the security
    headers to every response, and turns any exception that escaped the app's handlers into the
    one error shape (JSON under /api, the HTML error page elsewhere) — with the headers, and
    without a stack trace. Starlette's own last-resort handler would skip both."""

    def __init__(self, app, csp: str):
        self.app = app
        self.headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin"),
            (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), interest-cohort=()"),
            (b"cross-origin-opener-policy", b"same-origin"),
            (b"cross-origin-resource-policy", b"same-origin"),
        ]
        self.csp = csp.encode()
        self.docs_csp = DOCS_CSP.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        csp = self.docs_csp if path in ("/docs", "/redoc", "/docs/oauth2-redirect") else self.csp
        started = False

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [h for h in message.get("headers", []) if h[0] != b"server"]
                headers += self.headers
                headers.append((b"content-security-policy", csp))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            log.error("unhandled error on %s %s", scope.get("method"), path, exc_info=exc)
            if started:
                return  # the response is half sent; the server closes the connection
            from starlette.requests import Request

            request = Request(scope)
            respond = getattr(scope.get("app"), "state", None)
            respond = getattr(respond, "respond_error", None) if respond is not None else None
            if respond is not None:
                response = respond(request, 500, "internal_error", "internal error; the server log has the details")
            else:
                from app.api.errors import error_body
                from app.responses import JSON

                response = JSON(error_body(500, "internal_error", "internal error"), status_code=500)
            await response(scope, receive, send_with_headers)


def warm_up(app: FastAPI) -> None:
    """Decode the vocabularies of the published SAEs before the first request (about a second for a
    50k-token vocabulary, which would otherwise stall the first page view of each worker), then
    move everything allocated so far out of the garbage collector's reach (gc.freeze), so that its
    full collections stay short while the server runs."""
    import store

    try:
        with app.state.sessionmaker() as session:
            for lm_id in {s.lm_id for s in store.list_saes(session)}:
                store.vocab_for(session, lm_id)
    except Exception as exc:  # warming is an optimisation: never refuse to start because of it
        log.warning("could not pre-load vocabularies: %s", exc)
    global _frozen
    if not _frozen:  # once per process: a server worker starts one app
        _frozen = True
        gc.collect()
        gc.freeze()


_frozen = False


def create_app(engine: Engine | None = None, settings: Settings | None = None, check: bool = True) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or make_engine(settings.sqlalchemy_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if check:
            check_schema(engine)  # refuse to serve an out-of-date schema
            warm_up(app)
        yield

    app = FastAPI(
        title="SAE Atlas",
        version=__version__,
        description="Sparse autoencoder features of language models: statistics, examples, logit effects, "
                    "neighbours and explanations. Reads are public unless the server says otherwise; writes need "
                    "an API key sent as `Authorization: Bearer <key>`.",
        lifespan=lifespan,
        openapi_url="/api/v1/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = session_factory(engine)
    app.state.read_sessionmaker = session_factory(engine.execution_options(isolation_level="AUTOCOMMIT"))
    install_error_handlers(app, html_error)
    app.include_router(api_router)
    app.include_router(pages_router)
    app.include_router(run_pages_router)
    app.include_router(graph_pages_router)
    app.include_router(live_pages_router)
    app.include_router(lineage_pages_router)
    app.include_router(structure_pages_router)
    app.include_router(compare_pages_router)
    app.mount("/static", StaticFiles(directory=resource_dir("static")), name="static")
    # Outermost last: security headers on everything, then the body limit, then the write-key
    # gate, both before any body is read.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SecurityHeaders, csp=content_security_policy(settings))
    return app
