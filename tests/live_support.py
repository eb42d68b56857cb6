"""Test support for the live model: a published tiny SAE, the inference service and the API
served by uvicorn in background threads (real sockets, real HTTP between the two)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest


@contextmanager
def serving(app, port: int | None = None, uds: str | None = None):
    """Run an ASGI app with uvicorn in a thread; yields the server."""
    import uvicorn

    from tests.helpers import free_port

    if uds is None and port is None:
        port = free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, uds=uds, log_level="warning", lifespan="on")
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(20)


def live_settings(tmp_path, inference_url: str, **overrides):
    from store.settings import Settings

    return Settings(data_dir=str(tmp_path / "data"), inference_url=inference_url, device="cpu", **overrides)


@contextmanager
def live_stack(engine, tmp_path, service_overrides: dict | None = None, api_overrides: dict | None = None):
    """(api base URL, api settings, service app): the service on a Unix socket, the API on a port."""
    from app.inference.service import create_service_app
    from app.main import create_app
    from tests.helpers import free_port

    sock = str(tmp_path / "inference.sock")
    url = f"unix:{sock}"
    service_settings = live_settings(tmp_path, url, **(service_overrides or {}))
    api_settings = live_settings(tmp_path, url, **(api_overrides or {}))
    service_app = create_service_app(service_settings, db_engine=engine)
    with serving(service_app, uds=sock):
        port = free_port()
        with serving(create_app(engine=engine, settings=api_settings), port=port):
            yield f"http://127.0.0.1:{port}", api_settings, service_app
