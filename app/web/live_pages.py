"""Pages of the live model: try your text on a latent, search by text, steer, contrast two sets.

Every form is a plain POST that works without JavaScript (the answer is a whole page); htmx
swaps the try-text and search results in place, and static/live.js streams steering tokens from
the API as they are generated (fetch + server-sent events, no inline script). With inference off
the pages say so instead of showing forms; stored contrastive queries still show.
"""

from __future__ import annotations

import hashlib
import math

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup, escape
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.live import admit, inference_enabled, latent_on_text, query_payload, run_contrast, search_by_text, steer_collect
from app.deps import get_session, read_access
from app.inference.queries import load_query, parse_upload, query_texts, split_texts
from app.inference.schemas import (
    MAX_NEW_TOKENS,
    MAX_STEER_FEATURES,
    MAX_STRENGTH,
    MAX_TEXT_CHARS,
    ActivationsRequest,
    ContrastRequest,
    SearchRequest,
    ServiceError,
    SteerRequest,
)
from app.web.rendering import is_htmx, render

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])
NO_STORE = {"Cache-Control": "no-store", "Vary": "HX-Request"}
STEER_ROWS = 3  # (SAE, latent, strength) rows the form shows; empty rows are ignored


def _validated(model: type[BaseModel], data: dict):
    """A form's fields through the API's request model; the first problem as a 422."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ()))
        msg = e.get("msg", "invalid value").removeprefix("Value error, ")
        raise ApiError(422, "invalid_parameters", f"{where}: {msg}" if where else msg) from None


def _float(name: str, value: str | None, default=None):
    if value is None or not value.strip():
        return default
    try:
        x = float(value.strip())
    except ValueError:
        raise ApiError(422, "invalid_parameters", f"{name} must be a number, not {value.strip()[:40]!r}") from None
    if not math.isfinite(x):
        raise ApiError(422, "invalid_parameters", f"{name} must be a finite number")
    return x


def _int(name: str, value: str | None, default=None):
    x = _float(name, value, None)
    if x is None:
        return default
    if x != int(x):
        raise ApiError(422, "invalid_parameters", f"{name} must be a whole number")
    return int(x)


def token_strip(vocab: store.Vocab, ids: list[int], acts: list[float], masked: list[bool], scale: float,
                peak: int | None) -> Markup:
    """The text's tokens coloured like the examples (a0..a9: tenths of `scale`, the latent's analysed
    max), the peak bold, values in `title`; BOS and attention sinks greyed (not scored, as in the analysis)."""
    html, n = vocab.html, len(vocab.html)
    inv = 10.0 / scale if scale and scale > 0 else 10.0
    out = []
    for i, (t, a, m) in enumerate(zip(ids, acts, masked)):
        label = html[t] if 0 <= t < n else str(escape(f"<{t}>"))
        cls = "t masked" if m else (f"t a{min(9, int(a * inv))}" if a > 0 else "t")
        if i == peak:
            cls += " pk"
        title = "not scored (BOS or attention sink)" if m else f"{a:.3g}"
        out.append(f'<span class="{cls}" title="{title}">{label}</span>')
    return Markup("".join(out))


# --- try your text on a feature page -----------------------------------------------------------

def _try_context(request: Request, session: Session, name: str, index: int, text: str, result: dict | None) -> dict:
    f = store.load_feature(session, name, index)
    ctx = {"sae": f.sae, "f": f, "text": text, "r": result, "live": inference_enabled(request)}
    if result is not None:
        vocab = store.vocab_for(session, f.sae.lm_id)
        peak = result["peak"]["position"] if result["peak"] else None
        ctx["strip"] = token_strip(vocab, result["token_ids"], result["activations"], result["masked"], f.max_act, peak)
    return ctx


@router.get("/saes/{name}/features/{index}/try", response_class=HTMLResponse)
def try_form(request: Request, name: str = Path(max_length=200), index: int = Path(ge=0, le=store.MAX_LATENT_INDEX),
             session: Session = Depends(get_session)):
    return render(request, "try.html", _try_context(request, session, name, index, "", None), headers=NO_STORE)


@router.post("/saes/{name}/features/{index}/try", response_class=HTMLResponse)
def try_text(request: Request, name: str = Path(max_length=200), index: int = Path(ge=0, le=store.MAX_LATENT_INDEX),
             text: str = Form("", max_length=MAX_TEXT_CHARS), session: Session = Depends(get_session)):
    body = _validated(ActivationsRequest, {"text": text})
    admit(request, session)
    result = latent_on_text(request, session, name, index, body)
    ctx = _try_context(request, session, name, index, text, result)
    if is_htmx(request):
        return render(request, "_try_result.html", ctx, headers=NO_STORE)
    return render(request, "try.html", ctx, headers=NO_STORE)


# --- search by text ----------------------------------------------------------------------------

def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _search_page_context(request: Request, session: Session) -> dict:
    saes = store.list_saes(session)
    lms = [lm for lm in store.list_lms(session) if any(s.lm_id == lm.id for s in saes)]
    return {"live": inference_enabled(request), "lms": lms, "saes": saes, "text": "", "model": lms[0].name if lms else "",
            "rank_by": "relative", "density_min": "", "density_max": "", "limit": 50, "res": None}


@router.get("/search/text", response_class=HTMLResponse)
def search_text_form(request: Request, session: Session = Depends(get_session)):
    return render(request, "search_text.html", _search_page_context(request, session), headers=NO_STORE)


@router.post("/search/text", response_class=HTMLResponse)
def search_text(request: Request, text: str = Form("", max_length=MAX_TEXT_CHARS), model: str = Form("", max_length=200),
                rank_by: str = Form("relative", max_length=20), density_min: str = Form("", max_length=40),
                density_max: str = Form("", max_length=40), limit: str = Form("50", max_length=10),
                positions: list[str] = Form([]), for_text: str = Form("", max_length=64),
                session: Session = Depends(get_session)):
    # Clicked tokens belong to the text they were clicked on: a new text starts with none.
    picked = sorted({_int("positions", p) for p in positions[:8192]}) if for_text == _text_key(text) else []
    body = _validated(SearchRequest, {
        "text": text, "model": model or None, "rank_by": rank_by, "positions": picked or None,
        "density_min": _float("density_min", density_min), "density_max": _float("density_max", density_max),
        "limit": _int("limit", limit, 50)})
    admit(request, session)
    res = search_by_text(request, session, body)
    ctx = _search_page_context(request, session)
    ctx.update(text=text, model=res["model"], rank_by=rank_by, density_min=density_min, density_max=density_max,
               limit=body.limit, res=res, for_text=_text_key(text), picked=set(picked))
    vocab = store.vocab_for(session, next(s.lm_id for s in ctx["saes"] if s.name in res["saes"]))
    ctx["tokens"] = [(i, Markup(vocab.display_html(t)), m) for i, (t, m) in enumerate(zip(res["token_ids"], res["masked"]))]
    for item in res["items"]:  # a window of the text around each result's peak, coloured by that latent
        p = item["position"]
        lo, hi = max(0, p - 12), min(len(res["token_ids"]), p + 6)
        item["snippet"] = token_strip(vocab, res["token_ids"][lo:hi], item["activations"][lo:hi], res["masked"][lo:hi],
                                      item["max_activation"] or max(item["activations"]), p - lo)
    if is_htmx(request) and request.headers.get("hx-target") == "live-results":
        return render(request, "_search_text_results.html", ctx, headers=NO_STORE)
    return render(request, "search_text.html", ctx, headers=NO_STORE)


# --- steering ----------------------------------------------------------------------------------

def _steer_context(request: Request, session: Session, form: dict, result: dict | None = None) -> dict:
    saes = store.list_saes(session)
    return {"live": inference_enabled(request), "saes": saes, "form": form, "r": result, "rows": range(STEER_ROWS),
            "max_new_tokens": MAX_NEW_TOKENS, "max_strength": MAX_STRENGTH}


@router.get("/steer", response_class=HTMLResponse)
def steer_form(request: Request, sae: str = Query("", max_length=200), index: str = Query("", max_length=12),
               strength: str = Query("", max_length=20), session: Session = Depends(get_session)):
    form = {"prompt": "", "method": "add", "max_new_tokens": 32, "temperature": 0.5, "seed": 0, "chat_template": False,
            "features": [{"sae": sae, "index": index, "strength": strength or ("4" if sae else "")}]}
    ctx = _steer_context(request, session, form)
    if sae:
        s = next((x for x in ctx["saes"] if x.name == sae), None)
        if s is None:
            raise ApiError(404, "not_found", f"no SAE named {sae!r}")
    return render(request, "steer.html", ctx, headers=NO_STORE)


@router.post("/steer", response_class=HTMLResponse)
def steer(request: Request, prompt: str = Form("", max_length=MAX_TEXT_CHARS), method: str = Form("add", max_length=10),
          max_new_tokens: str = Form("32", max_length=10), temperature: str = Form("0.5", max_length=20),
          seed: str = Form("0", max_length=20), chat_template: str = Form("", max_length=10),
          sae: list[str] = Form([]), index: list[str] = Form([]), strength: list[str] = Form([]),
          session: Session = Depends(get_session)):
    rows = []
    for s, i, v in list(zip(sae, index, strength))[:MAX_STEER_FEATURES]:
        if not s.strip() and not i.strip():
            continue
        rows.append({"sae": s.strip()[:200], "index": _int("latent", i), "strength": _float("strength", v, 0.0)})
    form = {"prompt": prompt, "method": method, "max_new_tokens": max_new_tokens, "temperature": temperature,
            "seed": seed, "chat_template": bool(chat_template), "features": rows or [{"sae": "", "index": "", "strength": ""}]}
    body = _validated(SteerRequest, {"prompt": prompt, "features": rows, "method": method,
                                     "max_new_tokens": _int("max_new_tokens", max_new_tokens, 32),
                                     "temperature": _float("temperature", temperature, 0.5),
                                     "seed": _int("seed", seed, 0), "chat_template": bool(chat_template)})
    admit(request, session)
    result = steer_collect(request, body)
    return render(request, "steer.html", _steer_context(request, session, form, result), headers=NO_STORE)


# --- contrastive search ------------------------------------------------------------------------

@router.get("/contrast", response_class=HTMLResponse)
def contrast_form(request: Request, session: Session = Depends(get_session)):
    saes = store.list_saes(session)
    lms = [lm for lm in store.list_lms(session) if any(s.lm_id == lm.id for s in saes)]
    s = request.app.state.settings
    return render(request, "contrast.html", {"live": inference_enabled(request), "lms": lms,
                                             "max_texts": s.inference_contrast_max_texts,
                                             "max_bytes": s.inference_contrast_max_bytes}, headers=NO_STORE)


async def _read_upload(upload: UploadFile | None, max_bytes: int) -> tuple[str, bytes]:
    if upload is None or not upload.filename:
        return "", b""
    data = await upload.read(max_bytes + 1)
    return upload.filename, data


@router.post("/contrast")
async def contrast_submit(request: Request, texts_a: str = Form("", max_length=4_000_000),
                          texts_b: str = Form("", max_length=4_000_000),
                          file_a: UploadFile | None = File(None), file_b: UploadFile | None = File(None),
                          label_a: str = Form("A", max_length=100), label_b: str = Form("B", max_length=100),
                          split: str = Form("blank", max_length=10), model: str = Form("", max_length=200),
                          direction: str = Form("both", max_length=10), density_min: str = Form("", max_length=40),
                          density_max: str = Form("", max_length=40), limit: str = Form("50", max_length=10),
                          session: Session = Depends(get_session)):
    from starlette.concurrency import run_in_threadpool

    s = request.app.state.settings
    sets = []
    for label, pasted, upload in (("set A", texts_a, file_a), ("set B", texts_b, file_b)):
        name, data = await _read_upload(upload, s.inference_contrast_max_bytes)
        try:
            texts = parse_upload(name, data, split, s.inference_contrast_max_bytes, label) if name else []
        except ServiceError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        sets.append(texts + split_texts(pasted, "line" if split == "line" else "blank"))
    body = _validated(ContrastRequest, {
        "set_a": sets[0], "set_b": sets[1], "label_a": label_a.strip() or "A", "label_b": label_b.strip() or "B",
        "model": model or None, "direction": direction, "density_min": _float("density_min", density_min),
        "density_max": _float("density_max", density_max), "limit": _int("limit", limit, 50)})

    def work():
        who = admit(request, session)
        return run_contrast(request, session, body, who).id

    query_id = await run_in_threadpool(work)
    return RedirectResponse(f"/contrast/{query_id}", status_code=303)


@router.get("/contrast/{query_id}", response_class=HTMLResponse)
def contrast_page(request: Request, query_id: str = Path(max_length=64), session: Session = Depends(get_session)):
    row = load_query(session, query_id)
    a, b = query_texts(row)
    return render(request, "contrast_result.html", {"q": query_payload(session, row), "texts_a": a[:50], "texts_b": b[:50],
                                                    "live": inference_enabled(request)},
                  headers={"Cache-Control": "no-cache"})
