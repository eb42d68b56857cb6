"""The live model in the API: a latent on your text, search by text, steering, service status.

Handlers are plain `def` (FastAPI runs them in its thread pool): each one reads the store, asks
the inference service (app.inference.client), and adds what only the store knows (token
strings, explanations, links). The functions without a route are shared with the pages
(app/web/live_pages.py). Live requests need inference to be on (503 "inference_off" otherwise)
and, from anonymous clients, stay within the per-address rate limit (429).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import orjson
from fastapi import APIRouter, Depends, Path, Request
from sqlalchemy.orm import Session
from starlette.responses import StreamingResponse

import store
from app.api_error import ApiError
from app.deps import get_session, read_access
from app.inference.client import InferenceClient, client_for
from app.inference.ratelimit import RateLimiter, retry_after_header
from app.inference.schemas import (
    ActivationsRequest,
    ActivationsResponse,
    InferenceStatus,
    SearchRequest,
    SearchResponse,
    SteerRequest,
    SteerResponse,
)
from app.responses import JSON
from app.security import presented_key, session_key, verify_key

router = APIRouter(tags=["live model"], dependencies=[Depends(read_access)])

Index = Path(ge=0, le=store.MAX_LATENT_INDEX, description="latent index (0-based)")
SaeName = Path(min_length=1, max_length=200, description="name of a published SAE")

OFF_MESSAGE = ("live inference is turned off on this server (SAE_ATLAS_INFERENCE=off): it serves the stored atlas "
               "only")


# --- the gate every live request passes ----------------------------------------------------------

def inference_enabled(request: Request) -> bool:
    return request.app.state.settings.inference == "on"


def client(request: Request) -> InferenceClient:
    s = request.app.state.settings
    if s.inference != "on":
        raise ApiError(503, "inference_off", OFF_MESSAGE)
    return client_for(s.inference_url, s.inference_timeout_s)


def _limiter(request: Request) -> RateLimiter:
    limiter = getattr(request.app.state, "live_rate_limiter", None)
    if limiter is None:
        limiter = request.app.state.live_rate_limiter = RateLimiter(request.app.state.settings.inference_rate_per_minute)
    return limiter


def admit(request: Request, session: Session) -> str | None:
    """Let a live request through: a valid key is never limited (returns its name); an anonymous
    client is held to the per-address rate. A wrong key is refused rather than treated as none."""
    if not inference_enabled(request):
        raise ApiError(503, "inference_off", OFF_MESSAGE)
    key = presented_key(request)
    if key is not None:
        row = verify_key(session, key)
        if row is None:
            raise ApiError(403, "forbidden", "the API key is not valid or has been revoked")
        return row.name
    signed_in = session_key(session, request)  # a browser signed in at /login
    if signed_in is not None:
        return signed_in.name
    wait = _limiter(request).acquire(request.client.host if request.client else "unknown")
    if wait > 0:
        raise ApiError(429, "rate_limited", f"too many live requests from this address; try again in {math.ceil(wait)} s "
                                            "(requests with an API key are not limited)", headers=retry_after_header(wait))
    return None


# --- operations shared with the pages ----------------------------------------------------------

def _tokens(vocab: store.Vocab, ids: list[int]) -> list[str]:
    import numpy as np

    return list(vocab.texts(np.asarray(ids, dtype=np.int64)))


def latent_on_text(request: Request, session: Session, sae: str, index: int, body: ActivationsRequest) -> dict:
    f = store.load_feature(session, sae, index)
    payload = {"sae": f.sae.name, "latents": [index]}
    payload.update({"text": body.text} if body.text is not None else {"token_ids": body.token_ids})
    res = client(request).post("/v1/activations", payload)
    vocab = store.vocab_for(session, f.sae.lm_id)
    ids, acts, masked = res["token_ids"], res["activations"][0], res["masked"]
    peak = None
    live = [(a, i) for i, (a, m) in enumerate(zip(acts, masked)) if not m]
    if live:
        a, i = max(live)
        if a > 0:
            peak = {"position": i, "token": vocab.text(ids[i]), "activation": a,
                    "relative": a / f.max_act if f.max_act > 0 else None}
    return {"sae": f.sae.name, "index": index, "max_activation": f.max_act, "token_ids": ids, "tokens": _tokens(vocab, ids),
            "activations": acts, "masked": masked, "peak": peak, "explanation": f.explanation,
            "links": {"feature": f"/api/v1/saes/{f.sae.name}/features/{index}", "page": f"/saes/{f.sae.name}/features/{index}",
                      "steer": f"/steer?sae={f.sae.name}&index={index}"}}


def search_by_text(request: Request, session: Session, body: SearchRequest) -> dict:
    res = client(request).post("/v1/search", body.model_dump())
    saes = {s.name: s for s in store.list_saes(session) if s.name in set(res["saes"])}
    if not saes:
        raise ApiError(404, "not_found", "the SAEs searched are no longer published")
    vocab = store.vocab_for(session, next(iter(saes.values())).lm_id)
    ids = res["token_ids"]
    by_sae: dict[str, list[int]] = {}
    for item in res["items"]:
        by_sae.setdefault(item["sae"], []).append(item["index"])
    expl = {name: store.neighbor_explanations(session, saes[name].id, idx) for name, idx in by_sae.items() if name in saes}
    items = []
    for item in res["items"]:
        name, i = item["sae"], item["index"]
        items.append({**item, "token": vocab.text(ids[item["position"]]), "explanation": expl.get(name, {}).get(i),
                      "links": {"feature": f"/api/v1/saes/{name}/features/{i}", "page": f"/saes/{name}/features/{i}"}})
    return {"model": res["model"], "token_ids": ids, "tokens": _tokens(vocab, ids), "masked": res["masked"],
            "positions": body.positions, "rank_by": body.rank_by, "saes": res["saes"], "items": items}


def steer_events(request: Request, body: SteerRequest) -> Iterator[dict]:
    """The service's events: start, token (row default|steered), then done or error."""
    return client(request).stream("/v1/steer", body.model_dump())


def steer_collect(request: Request, body: SteerRequest) -> dict:
    model = None
    for event in steer_events(request, body):
        kind = event.get("type")
        if kind == "start":
            model = event.get("model")
        elif kind == "error":
            err = event["error"]
            raise ApiError(int(err.get("status", 503)), err.get("code", "unavailable"), err.get("message", "steering failed"),
                           headers={"Retry-After": "5"} if int(err.get("status", 503)) == 503 else None)
        elif kind == "done":
            return {"model": model, "prompt_token_ids": event["prompt_token_ids"], "method": body.method,
                    "default": event["default"], "steered": event["steered"],
                    "features": [f.model_dump() for f in body.features]}
    raise ApiError(503, "unavailable", "the inference service ended the answer early; try again", headers={"Retry-After": "5"})


def sse(events: Iterator[dict]) -> Iterator[bytes]:
    """Server-sent events: `event: <type>` and `data: <json>` per event."""
    for event in events:
        kind = event.get("type", "message")
        yield b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


# --- routes ------------------------------------------------------------------------------------

@router.post("/saes/{sae}/features/{index}/activations", response_model=ActivationsResponse,
             summary="This latent's activation on every token of your text",
             responses={404: {"description": "unknown SAE or latent"}, 422: {"description": "bad text"},
                        429: {"description": "rate limited"}, 503: {"description": "busy, timed out or off"}})
def activations(request: Request, body: ActivationsRequest, sae: str = SaeName, index: int = Index,
                session: Session = Depends(get_session)):
    admit(request, session)
    return JSON(latent_on_text(request, session, sae, index, body))


@router.post("/search/inference", response_model=SearchResponse,
             summary="The latents of every SAE of a model that fire most on your text (one forward pass)",
             responses={404: {"description": "unknown model or SAE"}, 422: {"description": "bad parameters"},
                        429: {"description": "rate limited"}, 503: {"description": "busy, timed out or off"}})
def search_inference(request: Request, body: SearchRequest, session: Session = Depends(get_session)):
    admit(request, session)
    return JSON(search_by_text(request, session, body))


@router.post("/steer", response_model=SteerResponse,
             summary="Default and steered continuations of a prompt, side by side (stream=true: server-sent events)",
             responses={200: {"content": {"text/event-stream": {}}}, 404: {"description": "unknown SAE or latent"},
                        422: {"description": "bad parameters"}, 429: {"description": "rate limited"},
                        503: {"description": "busy, timed out or off"}})
def steer(request: Request, body: SteerRequest, session: Session = Depends(get_session)):
    admit(request, session)
    if body.stream or "text/event-stream" in request.headers.get("accept", ""):
        events = steer_events(request, body)  # raises before streaming on errors the service found first
        return StreamingResponse(sse(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    return JSON(steer_collect(request, body))


@router.get("/inference", response_model=InferenceStatus, summary="Whether live inference is on and what it holds")
def inference_status(request: Request):
    return JSON(live_status(request))


def live_status(request: Request) -> dict:
    s = request.app.state.settings
    if s.inference != "on":
        return {"enabled": False, "reachable": False, "message": OFF_MESSAGE}
    try:
        st = client(request).status()
    except ApiError as exc:
        return {"enabled": True, "reachable": False, "message": exc.message}
    return {"enabled": True, "reachable": True, "message": "ready", "device": st["device"], "loaded": st["loaded"],
            "memory_mb": st["memory_mb"], "memory_budget_mb": st["memory_budget_mb"], "queued": st["engine"]["held"],
            "limits": {**st["limits"], "rate_per_minute": s.inference_rate_per_minute}}
