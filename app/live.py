"""The live model's operations that the JSON API (app/api/live.py, app/api/contrast.py) and the
pages (app/web/live_pages.py) share: the gate every live request passes (inference on, keys, the
per-address rate), and each operation that asks the inference service and adds what only the
store knows (token strings, explanations, links).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.inference.client import InferenceClient, client_for
from app.inference.queries import save_query
from app.inference.ratelimit import RateLimiter, retry_after_header
from app.inference.schemas import ActivationsRequest, ContrastRequest, SearchRequest, SteerRequest
from app.security import presented_key, session_key, verify_key
from store.models import ContrastQuery

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


# --- contrastive search ---

def run_contrast(request: Request, session: Session, body: ContrastRequest, requested_by: str | None) -> ContrastQuery:
    limit = request.app.state.settings.inference_contrast_max_texts
    max_bytes = request.app.state.settings.inference_contrast_max_bytes
    for label, texts in (("set_a", body.set_a), ("set_b", body.set_b)):
        if len(texts) > limit:
            raise ApiError(422, "invalid_parameters", f"{label} has {len(texts)} texts; the limit is {limit} "
                                                      "(SAE_ATLAS_INFERENCE_CONTRAST_MAX_TEXTS)")
        size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > max_bytes:
            raise ApiError(413, "too_large", f"{label} holds {size:,} bytes of text; the limit is {max_bytes:,} "
                                             "(SAE_ATLAS_INFERENCE_CONTRAST_MAX_BYTES)")
        if any("\x00" in t for t in texts):
            raise ApiError(422, "invalid_parameters", f"{label}: texts must not contain NUL characters")
    for label in (body.label_a, body.label_b):
        if "\x00" in label:
            raise ApiError(422, "invalid_parameters", "labels must not contain NUL characters")
    answer = client(request).post("/v1/contrast", body.model_dump())
    return save_query(session, body, answer, requested_by)


def query_payload(session: Session, row: ContrastQuery) -> dict:
    res = row.result
    saes = {s.name: s for s in store.list_saes(session)}
    by_sae: dict[str, list[int]] = {}
    for item in res["items"]:
        by_sae.setdefault(item["sae"], []).append(item["index"])
    expl = {name: store.neighbor_explanations(session, saes[name].id, idx) for name, idx in by_sae.items() if name in saes}
    items = [{**item, "explanation": expl.get(item["sae"], {}).get(item["index"]),
              "links": {"feature": f"/api/v1/saes/{item['sae']}/features/{item['index']}",
                        "page": f"/saes/{item['sae']}/features/{item['index']}"}} for item in res["items"]]
    return {"id": row.id, "model": row.lm_name, "label_a": row.label_a, "label_b": row.label_b, "n_a": row.n_a,
            "n_b": row.n_b, "n_tests": res["n_tests"], "n_significant": res["n_significant"],
            "truncated_texts": res.get("truncated_texts", 0), "saes": res["saes"],
            "direction": row.params.get("direction", "both"), "items": items,
            "created_at": row.created_at.isoformat() if row.created_at else "",
            "links": {"self": f"/api/v1/contrast/{row.id}", "page": f"/contrast/{row.id}"}}
