"""HTML pages. Every page works without JavaScript; htmx (from a pinned CDN URL with an integrity
hash) only swaps partials in place: the feature table, the job status, the jobs list, search results.

Token strings are never trusted: each one is made visible (newlines, tabs, invisible characters)
and HTML-escaped once per vocabulary (store.Vocab.html / .chips); everything else goes through
Jinja's autoescaping. Nothing here writes an inline script or a style attribute (the CSP forbids
both): colours are classes, charts are SVG with classes.
"""

from __future__ import annotations

import hashlib
import math
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup
from sqlalchemy.orm import Session

import store
from app.api_error import ApiError
from app.autointerp import queue
from app.deps import get_session, read_access
from store import evaluations, lineage
from store.models import Job
from app.responses import cache_headers, etag_matches, not_modified
from app.security import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    csrf_token,
    csrf_valid,
    end_session,
    is_https,
    session_key,
    set_csrf_cookie,
    start_session,
    verify_key,
)
from app.web.rendering import (
    CSRF_PLACEHOLDER,
    form_key,
    forbidden_form,
    html_error,
    is_htmx,
    render,
    render_bytes,
    render_example_groups,
)
from app.web.structure_pages import feature_structure

router = APIRouter(include_in_schema=False)
pages = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


# --- pages ------------------------------------------------------------------------------------

@pages.get("/", response_class=HTMLResponse)
def home(request: Request, session: Session = Depends(get_session)):
    saes = store.list_saes(session)
    lms = store.list_lms(session)
    lms = [lm for lm in lms if any(s.lm_id == lm.id for s in saes)]
    return render(request, "home.html", {"saes": saes, "lms": lms, "jobs": store.job_counts(session)})


def _table_context(session: Session, sae, q: store.TableQuery) -> dict:
    rows, total = store.feature_table(session, sae, q)
    vocab = store.vocab_for(session, sae.lm_id)
    pages_n = max(1, (total + q.per_page - 1) // q.per_page)
    params = {k: v for k, v in {"sort": q.sort, "order": q.order, "density_min": q.density_min,
                                "density_max": q.density_max, "per_page": q.per_page,
                                "has_explanation": None if q.has_explanation is None else str(q.has_explanation).lower(),
                                "score_min": q.score_min}.items() if v is not None}
    items = []
    for f in rows:
        d = store.feature_summary(f, vocab)
        d["peak_html"] = None if f.peak_token_id is None else Markup(vocab.chip_html(f.peak_token_id))
        d["logits_html"] = [Markup(vocab.chip_html(t)) for t in d["top_logit_ids"]]
        items.append(d)
    return {"sae": sae, "rows": items, "total": total, "q": q, "pages": pages_n, "params": params,
            "first": (q.page - 1) * q.per_page + 1 if total else 0, "last": min(q.page * q.per_page, total),
            "qs": lambda **kw: urlencode({**params, **kw})}


def _parse_table_query(sort: str, order: str, density_min: str | None, density_max: str | None,
                       has_explanation: str | None, score_min: str | None, page: int, per_page: int) -> store.TableQuery:
    def opt_float(name, v, lo=0.0, hi=1.0):
        if v is None or v.strip() == "":
            return None
        try:
            x = float(v.strip().rstrip("%")) / (100 if v.strip().endswith("%") else 1)
        except ValueError:
            raise ApiError(422, "invalid_parameters", f"{name} must be a number between {lo:g} and {hi:g}") from None
        if math.isnan(x) or not lo <= x <= hi:
            raise ApiError(422, "invalid_parameters", f"{name} must be between {lo:g} and {hi:g}")
        return x

    if sort not in store.SORTS:
        raise ApiError(422, "invalid_parameters", f"sort must be one of {', '.join(store.SORTS)}")
    if order not in ("asc", "desc"):
        raise ApiError(422, "invalid_parameters", "order must be asc or desc")
    has = {"": None, None: None, "true": True, "false": False, "any": None}.get(has_explanation, "bad")
    if has == "bad":
        raise ApiError(422, "invalid_parameters", "has_explanation must be true, false or any")
    dmin, dmax = opt_float("density_min", density_min), opt_float("density_max", density_max)
    if dmin is not None and dmax is not None and dmin > dmax:
        raise ApiError(422, "invalid_parameters", "density_min must not exceed density_max")
    return store.TableQuery(sort, order, dmin, dmax, has, opt_float("score_min", score_min), page, per_page)


@pages.get("/saes/{name}", response_class=HTMLResponse)
def sae_page(request: Request, name: str = Path(max_length=200), sort: str = Query("index", max_length=20),
             order: str = Query("asc", max_length=10), density_min: str | None = Query(None, max_length=40),
             density_max: str | None = Query(None, max_length=40),
             has_explanation: str | None = Query(None, max_length=10), score_min: str | None = Query(None, max_length=40),
             page: int = Query(1, ge=1, le=1_000_000), per_page: int = Query(50, ge=1, le=store.MAX_PAGE_SIZE),
             session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    q = _parse_table_query(sort, order, density_min, density_max, has_explanation, score_min, page, per_page)
    ctx = _table_context(session, sae, q)
    if is_htmx(request) and request.headers.get("hx-target") == "feature-table":
        return render(request, "_feature_table.html", ctx, headers={"Vary": "HX-Request, HX-Target"})
    ctx["lm"] = sae.lm
    ctx["m"] = sae.metrics or {}
    ctx["ev"] = evaluations.evaluation_dict(evaluations.latest_evaluation(session, sae.id))
    return render(request, "sae.html", ctx, headers={"Vary": "HX-Request, HX-Target"})


@pages.get("/saes/{name}/jump")
def jump(request: Request, name: str = Path(max_length=200), index: str = Query("", max_length=40),
         session: Session = Depends(get_session)):
    sae = store.sae_by_name(session, name)
    try:
        i = int(index.strip().lstrip("#"))
    except ValueError:
        raise ApiError(422, "invalid_parameters", f"the latent number must be a whole number from 0 to {sae.d_sae - 1}") from None
    store.feature_by_index(session, sae, i)  # 404 when out of range
    return RedirectResponse(f"/saes/{sae.name}/features/{i}", status_code=303)


@pages.get("/saes/{name}/features/{index}", response_class=HTMLResponse)
def feature_page(request: Request, name: str = Path(max_length=200),
                 index: int = Path(ge=0, le=store.MAX_LATENT_INDEX),
                 queued: str | None = Query(None, max_length=10), session: Session = Depends(get_session)):
    f = store.load_feature(session, name, index, with_job=True)
    neighbor_expl = store.shown_neighbor_explanations(session, f)
    graph = lineage.relation_graph(session)
    token = csrf_token(request)
    # The page's ETag: what it shows (store.FeatureRow.etag), and the browser's CSRF token, which
    # its form carries (a browser keeps its own copy; the server's cache holds the page without it).
    shown = f.etag(page=True, neighbors=neighbor_expl, lineage=graph.tag(f.sae.id) if graph.of(f.sae.id) else None)
    etag = shown[:-1] + "-" + hashlib.sha256(token.encode()).hexdigest()[:8] + '"'
    headers = cache_headers(etag)
    if queued:  # the "explanation requested" notice is for this one view only
        headers = {"Cache-Control": "no-store"}
    elif etag_matches(request, etag):
        return not_modified(etag)
    key = ("page", f.sae.id, index, shown)
    body = None if queued else store.RENDERED.get(key)
    if body is None:
        vocab = store.vocab_for(session, f.sae.lm_id)
        payload = store.feature_payload(session, f.sae, f, vocab, with_text=False, neighbor_expl=neighbor_expl)
        render_example_groups(payload, vocab, f.max_act)
        job = store.live_job_for(session, f.id) if f.live_job else None
        body = render_bytes(request, "feature.html", {
            "sae": f.sae, "f": f, "p": payload, "vocab": vocab, "job": job,
            "queued": queued, "csrf": CSRF_PLACEHOLDER,
            "top_labels": [Markup(vocab.chip_html(d["token_id"])) for d in payload["logits"]["top"]],
            "bottom_labels": [Markup(vocab.chip_html(d["token_id"])) for d in payload["logits"]["bottom"]],
            "peak_html": None if f.peak_token_id is None else Markup(vocab.chip_html(f.peak_token_id)),
            "st": feature_structure(session, f.sae, index),
        })
        if not queued:
            store.RENDERED.put(key, body)
    response = HTMLResponse(body.replace(CSRF_PLACEHOLDER.encode(), token.encode()), headers=headers)
    set_csrf_cookie(request, response)
    return response


@pages.get("/saes/{name}/features/{index}/job", response_class=HTMLResponse)
def job_status(request: Request, name: str = Path(max_length=200), index: int = Path(ge=0, le=store.MAX_LATENT_INDEX),
               job: int | None = Query(None, ge=1, le=2**62), session: Session = Depends(get_session)):
    """The explanation-job note of a feature page (htmx polls it while the job is live): the job
    named by `job` (a primary-key read, so a finished job still shows as done), else the live one."""
    sae = store.sae_by_name(session, name)
    f = store.feature_by_index(session, sae, index)
    found = session.get(Job, job) if job else None
    if found is None or found.feature_id != f.id:
        found = store.live_job_for(session, f.id)
    return render(request, "_job_status.html", {"sae": sae, "f": f, "job": found}, headers={"Cache-Control": "no-store"})


@pages.post("/saes/{name}/features/{index}/explain", response_class=HTMLResponse)
def request_explanation(request: Request, name: str = Path(max_length=200),
                        index: int = Path(ge=0, le=store.MAX_LATENT_INDEX), api_key: str = Form("", max_length=200),
                        csrf_token: str = Form("", max_length=200), session: Session = Depends(get_session)):
    if not csrf_valid(request, csrf_token):
        return forbidden_form(request)
    sae = store.sae_by_name(session, name)
    f = store.feature_by_index(session, sae, index)
    key, status, message = form_key(session, request, api_key, "request an explanation")
    if key is None:
        if is_htmx(request):
            return render(request, "_job_status.html", {"sae": sae, "f": f, "job": None, "error": message}, status=status)
        return html_error(request, status, message)
    job, created = queue.enqueue(session, sae, f, priority=10, requested_by=key.name)
    session.commit()
    if is_htmx(request):
        return render(request, "_job_status.html", {"sae": sae, "f": f, "job": job, "created": created})
    return RedirectResponse(f"/saes/{sae.name}/features/{index}?queued=1#explanations", status_code=303)


@pages.get("/search", response_class=HTMLResponse)
def search(request: Request, q: str = Query("", max_length=200), token: str = Query("", max_length=100),
           sae: str = Query("", max_length=200), mode: str = Query("merged", max_length=20),
           session: Session = Depends(get_session)):
    from app.web.search_page import explanation_results

    sae_name = sae or None
    if sae_name:
        store.sae_by_name(session, sae_name)
    explanations, search_info = explanation_results(session, q, mode, sae_name)
    tokens = store.search_by_token(session, token, 100, sae_name) if token.strip() else []
    vocabs: dict[str, store.Vocab] = {}
    if tokens:
        for s in store.list_saes(session):
            vocabs[s.name] = store.vocab_for(session, s.lm_id)
        for r in tokens:
            v = vocabs.get(r["sae"])
            r["peak_html"] = Markup(v.chip_html(r["peak_token_id"])) if v and r["peak_token_id"] is not None else ""
    ctx = {"q": q, "token": token, "sae_name": sae or "", "explanations": explanations, "tokens": tokens,
           "saes": store.list_saes(session), "search": search_info}
    if is_htmx(request) and request.headers.get("hx-target") == "results":
        return render(request, "_search_results.html", ctx, headers={"Vary": "HX-Request, HX-Target"})
    return render(request, "search.html", ctx, headers={"Vary": "HX-Request, HX-Target"})


@pages.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, status: str | None = Query(None, max_length=20), session: Session = Depends(get_session)):
    if status not in (None, "", *JOB_STATUSES):
        raise ApiError(422, "invalid_parameters", "status must be queued, running, done, failed or cancelled")
    jobs = store.recent_jobs(session, 100, status or None)
    ctx = {"counts": store.job_counts(session), "jobs": jobs, "status": status or "", "statuses": JOB_STATUSES}
    if is_htmx(request) and request.headers.get("hx-target") == "jobs-table":
        return render(request, "_jobs_table.html", ctx, headers={"Cache-Control": "no-store", "Vary": "HX-Request, HX-Target"})
    return render(request, "jobs.html", ctx, headers={"Cache-Control": "no-store", "Vary": "HX-Request, HX-Target"})


# --- signing in: a server-side session ------------------------------------------------------------

@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = Query("/", max_length=500), session: Session = Depends(get_session)):
    signed_in = session_key(session, request)
    return render(request, "login.html", {"next": _safe_next(next), "signed_in": signed_in},
                  headers={"Cache-Control": "no-store"})


@router.post("/login")
def login(request: Request, api_key: str = Form("", max_length=200), next: str = Form("/", max_length=500),
          csrf_token: str = Form("", max_length=200), session: Session = Depends(get_session)):
    if not csrf_valid(request, csrf_token):
        return forbidden_form(request)
    key = verify_key(session, api_key.strip() or None)
    if key is None:
        return render(request, "login.html", {"next": _safe_next(next), "error": "That API key is not valid."},
                      status=403 if api_key.strip() else 401)
    settings = request.app.state.settings
    end_session(session, request)  # a sign-in replaces any earlier session of this browser
    token = start_session(session, key, settings.session_ttl_s)
    session.commit()
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", secure=is_https(request),
                        max_age=int(settings.session_ttl_s), path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")  # forms now carry the session's own token
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form("", max_length=200), session: Session = Depends(get_session)):
    if not csrf_valid(request, csrf_token):
        return forbidden_form(request)
    end_session(session, request)
    session.commit()
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _safe_next(target: str) -> str:
    """Only local paths: never redirect to another site."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target or any(ord(c) < 32 for c in target):
        return "/"
    return target


router.include_router(pages)
