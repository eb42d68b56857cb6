"""What API workers call: the inference service over a local port or Unix socket.

The service answers in the API's one error shape; the client re-raises its errors as ApiError
with the same status, code and Retry-After, and turns an unreachable or silent service into a
503 that says what to do. Steering streams newline-delimited JSON events, read lazily.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import orjson

from store.errors import AtlasError


def parse_url(url: str) -> tuple[str, object]:
    """`http://HOST:PORT` -> ("tcp", (host, port)); `unix:/path` or `unix:///path` -> ("unix", path)."""
    if url.startswith("unix:"):
        path = url[len("unix:"):]
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        if not path:
            raise AtlasError(f"inference URL {url!r} names no socket", "use unix:/path/to/inference.sock")
        return "unix", path
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise AtlasError(f"invalid inference URL {url!r}", "use http://HOST:PORT or unix:/path/to.sock")
    return "tcp", (parts.hostname, parts.port or 80)


def ApiError(*args, **kwargs):
    from app.api_error import ApiError as _ApiError

    return _ApiError(*args, **kwargs)


def _unavailable(message: str, retry: int = 10):
    return ApiError(503, "unavailable", message, headers={"Retry-After": str(retry)})


class InferenceClient:
    def __init__(self, url: str, timeout_s: float):
        self.url = url
        kind, where = parse_url(url)
        if kind == "unix":
            transport, base = httpx.HTTPTransport(uds=where), "http://inference"
        else:
            transport, base = httpx.HTTPTransport(), f"http://{where[0]}:{where[1]}"
        # The service enforces each request's deadline itself; ours is a backstop a little later.
        self._http = httpx.Client(base_url=base, transport=transport,
                                  timeout=httpx.Timeout(timeout_s + 15, connect=3.0),
                                  limits=httpx.Limits(max_connections=256, max_keepalive_connections=32))

    def close(self) -> None:
        self._http.close()

    def _down(self, exc: Exception):
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return _unavailable("the inference service did not answer in time; try again shortly", 10)
        return _unavailable(f"the inference service is not running at {self.url} (start it with `sae-atlas inference`, "
                            "or set SAE_ATLAS_INFERENCE=off on a read-only mirror)", 10)

    @staticmethod
    def _raise_for(response: httpx.Response, body: bytes) -> None:
        try:
            err = orjson.loads(body)["error"]
            status, code, message = int(err["status"]), str(err["code"]), str(err["message"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise _unavailable(f"the inference service answered {response.status_code} without an error body") from None
        headers = {"Retry-After": response.headers["retry-after"]} if "retry-after" in response.headers else None
        if status >= 500 and status != 503:
            status, code = 503, "unavailable"  # a bug inside the service is still the service being unavailable here
            headers = headers or {"Retry-After": "10"}
        raise ApiError(status, code, message, err.get("details"), headers=headers)

    def post(self, path: str, body: dict) -> dict:
        try:
            response = self._http.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise self._down(exc) from None
        if response.status_code >= 400:
            self._raise_for(response, response.content)
        return orjson.loads(response.content)

    def status(self) -> dict:
        try:
            response = self._http.get("/v1/status", timeout=3.0)
        except httpx.HTTPError as exc:
            raise self._down(exc) from None
        if response.status_code >= 400:
            self._raise_for(response, response.content)
        return orjson.loads(response.content)

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The service's NDJSON events. The request is sent and its status checked before this
        returns, so errors before the first token raise here (with their status) rather than
        mid-stream; later errors arrive as {"type": "error"} events."""
        request = self._http.build_request("POST", path, content=orjson.dumps(body),
                                           headers={"content-type": "application/json"})
        try:
            response = self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._down(exc) from None
        if response.status_code >= 400:
            try:
                content = response.read()
            finally:
                response.close()
            self._raise_for(response, content)

        def events() -> Iterator[dict]:
            try:
                for line in response.iter_lines():
                    if line.strip():
                        yield orjson.loads(line)
            except httpx.HTTPError:
                yield {"type": "error", "error": {"status": 503, "code": "unavailable",
                                                  "message": "the inference service went away mid-answer"}}
            finally:
                response.close()

        return events()


_clients: dict[tuple, InferenceClient] = {}
_lock = threading.Lock()


def client_for(url: str, timeout_s: float) -> InferenceClient:
    """One client (one connection pool) per process and URL."""
    key = (url, timeout_s)
    with _lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = InferenceClient(url, timeout_s)
        return c
