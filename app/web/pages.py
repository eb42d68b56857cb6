"""HTML pages. Every page works without JavaScript; htmx (from a pinned CDN URL with an integrity
hash) only swaps partials in place: the feature table, the job status, the jobs list.

Token strings are never trusted: each one is made visible (newlines, tabs, invisible characters)
and HTML-escaped once per vocabulary (app.store.Vocab.html); everything else goes through
Jinja's autoescaping.
"""

from __future__ import annotations

import math
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from sqlalchemy.orm import Session

from app import __version__, store
from app.api.errors import ApiError
from app.autointerp import queue
from app.deps import get_session, read_access
from app.paths import resource_dir
from app.security import verify_key
from app.web import charts

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])
templates = Jinja2Templates(directory=str(resource_dir("templates")))
env = templates.env
env.globals.update(version=__version__, charts=charts)


def _pct(x, digits=1):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _num(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return f"{x:,}"
    if x != 0 and (abs(x) < 10 ** -(digits - 1) or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:,.{max(digits - 1, 0)}f}"


def _density(x):
    if not x:
        return "0"
    return f"{x:.2e} (1 in {1 / x:,.0f})" if x < 0.01 else f"{100 * x:.2f}%"


env.filters.update(pct=_pct, num=_num, density=_density, vis=store.visible)


def tokens_html(token_ids, acts, peak: int, vocab: store.Vocab, scale: float) -> Markup:
    """One example: a span per token, coloured by activation relative to the feature's max."""
    scale = scale if scale > 0 else 1.0
    out = []
    html = vocab.html
    n = len(html)
    for i, (t, a) in enumerate(zip(token_ids, acts)):
        a = float(a)
        cls = "t"
        if a > 0:
            cls += f" a{min(9, int(a / scale * 10))}"
        if i == peak:
            cls += " pk"
        label = html[t] if 0 <= t < n else f"&lt;{t}&gt;"
        value = f"{a:.3g}" if a else "0"
        out.append(f'<span class="{cls}" data-a="{value}" title="{value}">{label}</span>')
    return Markup("".join(out))


def render(request: Request, name: str, context: dict, status: int = 200, headers: dict | None = None) -> HTMLResponse:
    s = request.app.state.settings
    ctx = {"request": request, "htmx_url": s.htmx_url, "htmx_integrity": s.htmx_integrity, **context}
    return templates.TemplateResponse(request, name, ctx, status_code=status, headers=headers)


def html_error(request: Request, status: int, message: str) -> Response:
    try:
        return render(request, "error.html", {"status": status, "message": message}, status=status)
    except Exception:  # the error page itself must never fail with a traceback
        return HTMLResponse(f"<h1>{status}</h1>", status_code=status)


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


# --- pages ------------------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse)
def home(request: Request, session: Session = Depends(get_session)):
    saes = store.list_saes(session)
    lms = store.list_lms(session)
    return render(request, "home.html", {"saes": saes, "lms": lms, "jobs": store.job_counts(session)})


def _table_context(session: Session, sae, q: store.TableQuery) -> dict:
    rows, total = store.feature_table(session, sae, q)
    vocab = store.vocab_for(session, sae.lm_id)
    pages = max(1, (total + q.per_page - 1) // q.per_page)
    params = {k: v for k, v in {"sort": q.sort, "order": q.order, "density_min": q.density_min,
                                "density_max": q.density_max, "per_page": q.per_page,
                                "has_explanation": None if q.has_explanation is None else str(q.has_explanation).lower(),
                                "score_min": q.score_min}.items() if v is not None}
    return {"sae": sae, "rows": [store.feature_summary(f, vocab) for f in rows], "total": total, "q": q,
            "pages": pages, "params": params, "qs": lambda **kw: urlencode({**params, **kw})}


def _parse_table_query(sort: str, order: str, density_min: str | None, density_max: str | None,
                       has_explanation: str | None, score_min: str | None, page: int, per_page: int) -> store.TableQuery:
    def opt_float(name, v, lo=0.0, hi=1.0):
        if v is None or v == "":
            return None
        try:
            x = float(v)
        except ValueError:
            raise ApiError(422, "invalid_parameters", f"{name} must be a number") from None
        if not lo <= x <= hi or math.isnan(x):
            raise ApiError(422, "invalid_parameters", f"{name} must be between {lo} and {hi}")
        return x

    if sort not in store.SORTS:
        raise ApiError(422, "invalid_parameters", f"sort must be one of {', '.join(store.SORTS)}")
    if order not in ("asc", "desc"):
        raise ApiError(422, "invalid_parameters", "order must be asc or desc")
    has = {"": None, None: None, "true": True, "false": False, "any": None}.get(has_explanation, "bad")
    if has == "bad":
        raise ApiError(422, "invalid_parameters", "has_explanation must be true, false or any")
    return store.TableQuery(sort, order, opt_float("density_min", density_min), opt_float("density_max", density_max),
                            has, opt_float("score_min", score_min), page, per_page)


@router.get("/saes/{name}", response_class=HTMLResponse)
def sae_page(request: Request, name: str, sort: str = "index", order: str = "asc",
             density_min: str | None = None, density_max: str | None = None, has_explanation: str | None = None,
             score_min: str | None = None, page: int = Query(1, ge=1, le=1_000_000),
             per_page: int = Query(50, ge=1, le=store.MAX_PAGE_SIZE), session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    q = _parse_table_query(sort, order, density_min, density_max, has_explanation, score_min, page, per_page)
    ctx = _table_context(session, sae, q)
    if _is_htmx(request):
        return render(request, "_feature_table.html", ctx)
    return render(request, "sae.html", ctx)


@router.get("/saes/{name}/jump")
def jump(name: str, index: str = "", session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    try:
        i = int(index)
    except ValueError:
        raise ApiError(422, "invalid_parameters", "the latent index must be a whole number") from None
    store.feature_by_index(session, sae, i)  # 404 when out of range
    return RedirectResponse(f"/saes/{name}/features/{i}", status_code=303)


@router.get("/saes/{name}/features/{index}", response_class=HTMLResponse)
def feature_page(request: Request, name: str, index: int, queued: str | None = None, session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    f = store.feature_by_index(session, sae, index)
    etag = store.feature_etag(session, sae, f)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag and not queued:
        return Response(status_code=304, headers=headers)
    vocab = store.vocab_for(session, sae.lm_id)
    payload = store.feature_payload(session, sae, f, vocab)
    job = store.live_job_for(session, f.id)
    return render(request, "feature.html", {
        "sae": sae, "f": f, "p": payload, "vocab": vocab, "tokens_html": tokens_html, "job": job,
        "queued": queued, "lm": sae.lm,
        "top_labels": [Markup(vocab.display_html(d["token_id"])) for d in payload["logits"]["top"]],
        "bottom_labels": [Markup(vocab.display_html(d["token_id"])) for d in payload["logits"]["bottom"]],
    }, headers=None if queued else headers)


@router.get("/saes/{name}/features/{index}/job", response_class=HTMLResponse)
def job_status(request: Request, name: str, index: int, session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    f = store.feature_by_index(session, sae, index)
    return render(request, "_job_status.html", {"sae": sae, "f": f, "job": store.live_job_for(session, f.id)})


@router.post("/saes/{name}/features/{index}/explain", response_class=HTMLResponse)
def request_explanation(request: Request, name: str, index: int, api_key: str = Form("", max_length=200),
                        session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    f = store.feature_by_index(session, sae, index)
    key = verify_key(session, api_key.strip() or None)
    if key is None:
        message = "An API key is needed to request an explanation." if not api_key.strip() else "That API key is not valid."
        status = 401 if not api_key.strip() else 403
        if _is_htmx(request):
            return render(request, "_job_status.html", {"sae": sae, "f": f, "job": None, "error": message}, status=status)
        return html_error(request, status, message)
    job, created = queue.enqueue(session, sae, f, priority=10, requested_by=key.name)
    session.commit()
    if _is_htmx(request):
        return render(request, "_job_status.html", {"sae": sae, "f": f, "job": job, "created": created})
    return RedirectResponse(f"/saes/{name}/features/{index}?queued=1", status_code=303)


@router.get("/search", response_class=HTMLResponse)
def search(request: Request, q: str = Query("", max_length=200), token: str = Query("", max_length=100),
           sae: str = Query("", max_length=200), session: Session = Depends(get_session)):
    sae_name = sae or None
    if sae_name:
        store.sae_by_name(session, sae_name)
    explanations = store.search_explanations(session, q, 100, sae_name) if q.strip() else []
    tokens = store.search_by_token(session, token, 100, sae_name) if token.strip() else []
    ctx = {"q": q, "token": token, "sae_name": sae or "", "explanations": explanations, "tokens": tokens,
           "saes": store.list_saes(session)}
    if _is_htmx(request):
        return render(request, "_search_results.html", ctx)
    return render(request, "search.html", ctx)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, status: str | None = Query(None, max_length=20), session: Session = Depends(get_session)):
    if status not in (None, "", "queued", "running", "done", "failed", "cancelled"):
        raise ApiError(422, "invalid_parameters", "status must be queued, running, done, failed or cancelled")
    jobs = store.recent_jobs(session, 100, status or None)
    ctx = {"counts": store.job_counts(session), "jobs": jobs, "status": status or ""}
    if _is_htmx(request):
        return render(request, "_jobs_table.html", ctx)
    return render(request, "jobs.html", ctx)

