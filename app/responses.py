"""Fast JSON responses (orjson) and conditional GETs (ETag / If-None-Match)."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def dumps(content) -> bytes:
    return orjson.dumps(content, option=JSON_OPTIONS)


class JSON(JSONResponse):
    media_type = "application/json"

    def render(self, content) -> bytes:
        return dumps(content)


class RawJSON(Response):
    """A JSON body that is already serialised (for example from the render cache)."""

    media_type = "application/json"


def _opaque(tag: str) -> str:
    tag = tag.strip()
    return tag.removeprefix("W/")


def etag_matches(request: Request, etag: str) -> bool:
    """True when If-None-Match names `etag` (weak comparison, lists and * understood)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    if header.strip() == "*":
        return True
    want = _opaque(etag)
    return any(_opaque(t) == want for t in header.split(",") if len(t) < 200)


def not_modified(etag: str, cache_control: str = "no-cache") -> Response:
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": cache_control})


def cache_headers(etag: str, cache_control: str = "no-cache") -> dict[str, str]:
    # no-cache: clients may store the response but must revalidate (a cheap 304) before reuse,
    # because a feature's explanations can change without its SAE being republished.
    return {"ETag": etag, "Cache-Control": cache_control, "Vary": "Accept-Encoding, Authorization, X-API-Key"}
