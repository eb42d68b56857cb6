"""The live model in the API: a latent on your text, search by text, steering, service status.

Handlers are plain `def` (FastAPI runs them in its thread pool): each one reads the store, asks
the inference service (app.inference.client), and adds what only the store knows (token
strings, explanations, links); those operations live in app/live.py, which the pages share. Live requests need inference to be on (503 "inference_off" otherwise)
and, from anonymous clients, stay within the per-address rate limit (429).
"""

from __future__ import annotations

from collections.abc import Iterator

import orjson
from fastapi import APIRouter, Depends, Path, Request
from sqlalchemy.orm import Session
from starlette.responses import StreamingResponse

import store
from app.api_error import ApiError
from app.live import OFF_MESSAGE, admit, client, latent_on_text, search_by_text, steer_collect, steer_events
from app.deps import get_session, read_access
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

router = APIRouter(tags=["live model"], dependencies=[Depends(read_access)])

Index = Path(ge=0, le=store.MAX_LATENT_INDEX, description="latent index (0-based)")
SaeName = Path(min_length=1, max_length=200, description="name of a published SAE")

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
