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
import operator
import typing
from urllib.parse import urlencode

import numpy as np
from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from sqlalchemy.orm import Session

import store
from app import __version__
from app.api_error import ApiError
from app.autointerp import queue
from app.deps import get_session, read_access
from store.models import Job
from store.paths import resource_dir
from app.responses import cache_headers, etag_matches, not_modified
from app.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    SESSION_COOKIE,
    can_write,
    csrf_token,
    csrf_valid,
    end_session,
    is_https,
    session_key,
    set_csrf_cookie,
    start_session,
    verify_key,
)
from app.web import charts

router = APIRouter(include_in_schema=False)
pages = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])
templates = Jinja2Templates(directory=str(resource_dir("templates")))
env = templates.env
env.globals.update(version=__version__, charts=charts)
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


def _bad(x) -> bool:
    return x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))


def _pct(x, digits=1):
    if _bad(x):
        return "–"
    v = 100 * x
    if v != 0 and abs(v) < 10 ** -digits:
        return f"<{10 ** -digits:g}%"
    return f"{v:.{digits}f}%"


def _num(x, digits=3):
    """Numbers for people: thousands separators, 3 significant digits, no 1.23e-05 unless tiny."""
    if _bad(x):
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0:
        return "0"
    a = abs(x)
    if a < 1e-3 or a >= 1e6:
        return f"{x:.{digits - 1}e}"
    if a >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _density(x):
    """Feature density as a share of tokens, plus '1 in N' for rare features."""
    if _bad(x):
        return "–"
    if x <= 0:
        return "never fired"
    if x < 0.001:
        return f"{x:.2e} · 1 in {1 / x:,.0f}"
    if x < 0.01:
        return f"{100 * x:.3f}% · 1 in {1 / x:,.0f}"
    return f"{100 * x:.2f}%"


def _density_short(x):
    if _bad(x):
        return "–"
    if x <= 0:
        return "0"
    if x < 0.0001:
        return f"{x:.1e}"
    return f"{100 * x:.3g}%"


def _score(x):
    return "–" if _bad(x) else f"{x:.2f}"


def _log10(x):
    return "–" if _bad(x) or x <= 0 else f"{math.log10(x):.2f}"


env.filters.update(pct=_pct, num=_num, score=_score, density=_density, density_short=_density_short, log10=_log10,
                   vis=store.visible, chip=store.chip)

_TOKEN_CLASSES = [f"t a{i}" for i in range(10)]


def _examples_spans(examples: list[tuple], vocab: store.Vocab, scale: float) -> list[str]:
    """The token spans of many examples [(ids, acts, peak)] in one vectorised pass.

    Active tokens carry their value in `title` (a native tooltip without JavaScript; atlas.js shows
    a nicer one) and a colour class a0..a9 (activation / scale in tenths); inactive tokens are
    plain spans prebuilt once per vocabulary, which keeps a page of ~90 examples small and fast."""
    if not examples:
        return []
    lengths = [len(e[0]) for e in examples]
    ids = np.concatenate([e[0] for e in examples]).astype(np.int64, copy=False)
    acts = np.concatenate([e[1] for e in examples]).astype(np.float32, copy=False)
    html, spans = vocab.html, vocab.spans
    n_vocab = len(html)
    if len(ids) == 0:
        return [""] * len(examples)
    if int(ids.min()) >= 0 and int(ids.max()) < n_vocab:
        out = list(operator.itemgetter(*ids.tolist())(spans)) if len(ids) > 1 else [spans[int(ids[0])]]
    else:
        out = [spans[t] if 0 <= t < n_vocab else f'<span class="t">&lt;{t}&gt;</span>' for t in ids.tolist()]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    peaks = {int(s0 + e[2]) for s0, e, n in zip(starts.tolist(), examples, lengths) if 0 <= e[2] < n}
    inv = 10.0 / scale if scale and scale > 0 else 10.0
    active = np.flatnonzero(acts > 0)
    levels = np.minimum(9, (acts[active] * inv).astype(np.int64))
    for i, v, t, lv in zip(active.tolist(), acts[active].tolist(), ids[active].tolist(), levels.tolist()):
        label = html[t] if 0 <= t < n_vocab else f"&lt;{t}&gt;"
        cls = _TOKEN_CLASSES[lv] + " pk" if i in peaks else _TOKEN_CLASSES[lv]
        out[i] = f'<span class="{cls}" title="{v:.3g}">{label}</span>'
    for i in peaks:
        if not acts[i] > 0:
            t = int(ids[i])
            out[i] = f'<span class="t pk" title="0">{html[t] if 0 <= t < n_vocab else t}</span>'
    result = []
    pos = 0
    for n in lengths:
        result.append("".join(out[pos:pos + n]))
        pos += n
    return result


def _example_row(ex: dict, spans: str) -> str:
    return (f'<div class="ex"><span class="exval" title="activation at the bold token">{ex["activation"]:.3g}</span>'
            f'<span class="extext">{spans}</span></div>')


def render_example_groups(payload: dict, vocab: store.Vocab, scale: float) -> None:
    """Every example of a feature page as HTML in one vectorised pass: sets examples.top_html,
    examples.random_html and each interval's `html`."""
    ex = payload["examples"]
    groups = [ex["top"], *[g["examples"] for g in ex["intervals"]], ex["random"]]
    flat = [e for g in groups for e in g]
    spans = iter(_examples_spans([(e["token_ids"], e["acts"], e["peak"]) for e in flat], vocab, scale))
    htmls = [Markup("\n".join(_example_row(e, next(spans)) for e in g)) for g in groups]
    ex["top_html"], ex["random_html"] = htmls[0], htmls[-1]
    for g, h in zip(ex["intervals"], htmls[1:-1]):
        g["html"] = h


def examples_html(examples: list[dict], vocab: store.Vocab, scale: float) -> Markup:
    """Rows of examples (activation at the peak, then the coloured tokens), built in one go."""
    spans = _examples_spans([(ex["token_ids"], ex["acts"], ex["peak"]) for ex in examples], vocab, scale)
    return Markup("\n".join(
        f'<div class="ex"><span class="exval" title="activation at the bold token">{ex["activation"]:.3g}</span>'
        f'<span class="extext">{html}</span></div>' for ex, html in zip(examples, spans)))


# Cached pages are rendered with this in place of the CSRF token, put in per response.
CSRF_PLACEHOLDER = "__csrf_token_placeholder__"


def render_bytes(request: Request, name: str, context: dict) -> bytes:
    s = request.app.state.settings
    ctx = {"request": request, "htmx_url": s.htmx_url, "htmx_integrity": s.htmx_integrity,
           "htmx": _is_htmx(request), "csrf_field": CSRF_FIELD, **context}
    if "csrf" not in ctx:
        ctx["csrf"] = csrf_token(request)
    return env.get_template(name).render(ctx).encode()


def render(request: Request, name: str, context: dict, status: int = 200, headers: dict | None = None) -> HTMLResponse:
    response = HTMLResponse(render_bytes(request, name, context), status_code=status, headers=headers)
    set_csrf_cookie(request, response)
    return response


def forbidden_form(request: Request) -> HTMLResponse:
    """A form without this browser's CSRF token: from another site, or a page older than the sign-in."""
    return html_error(request, 403, "This form has expired or was sent from another site; reload the page and try again.")


def form_key(session: Session, request: Request, typed: str, what: str) -> tuple[typing.Any, int, str]:
    """(key, 0, "") for a form that may act: a write key typed into it, or else the sign-in
    session's key; (None, status, message) otherwise."""
    typed = typed.strip()
    key = verify_key(session, typed) if typed else session_key(session, request)
    if key is None:
        if typed:
            return None, 403, "That API key is not valid."
        return None, 401, f"An API key is needed to {what} (or sign in with a key that can write)."
    if not can_write(key):
        return None, 403, f"The key {key.name!r} can only read; to {what}, use a key with scope write."
    return key, 0, ""


def html_error(request: Request, status: int, message: str) -> Response:
    """The HTML error page; for an htmx request, just the message (htmx swaps it into the target)."""
    try:
        if _is_htmx(request) and not request.headers.get("hx-history-restore-request"):
            return HTMLResponse(f'<p class="notice err" role="alert">{escape(message)}</p>', status_code=status)
        ctx = {"status": status, "message": message, "title": {401: "API key needed", 403: "Not allowed",
                                                                  404: "Not found", 422: "Bad request",
                                                                  503: "Unavailable"}.get(status, "Error")}
        if status in (401, 403) and request.method == "GET" and not request.url.path.startswith("/login"):
            ctx["login_next"] = request.url.path
        return render(request, "error.html", ctx, status=status)
    except Exception:  # the error page itself must never fail with a traceback
        return HTMLResponse(f"<!doctype html><title>{status}</title><h1>{status}</h1>", status_code=status)


def _is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


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
    if _is_htmx(request) and request.headers.get("hx-target") == "feature-table":
        return render(request, "_feature_table.html", ctx, headers={"Vary": "HX-Request, HX-Target"})
    ctx["lm"] = sae.lm
    ctx["m"] = sae.metrics or {}
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
    token = csrf_token(request)
    # The page's ETag: what it shows (store.FeatureRow.etag), and the browser's CSRF token, which
    # its form carries (a browser keeps its own copy; the server's cache holds the page without it).
    shown = f.etag(page=True, neighbors=neighbor_expl)
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
        if _is_htmx(request):
            return render(request, "_job_status.html", {"sae": sae, "f": f, "job": None, "error": message}, status=status)
        return html_error(request, status, message)
    job, created = queue.enqueue(session, sae, f, priority=10, requested_by=key.name)
    session.commit()
    if _is_htmx(request):
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
    if _is_htmx(request) and request.headers.get("hx-target") == "results":
        return render(request, "_search_results.html", ctx, headers={"Vary": "HX-Request, HX-Target"})
    return render(request, "search.html", ctx, headers={"Vary": "HX-Request, HX-Target"})


@pages.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, status: str | None = Query(None, max_length=20), session: Session = Depends(get_session)):
    if status not in (None, "", *JOB_STATUSES):
        raise ApiError(422, "invalid_parameters", "status must be queued, running, done, failed or cancelled")
    jobs = store.recent_jobs(session, 100, status or None)
    ctx = {"counts": store.job_counts(session), "jobs": jobs, "status": status or "", "statuses": JOB_STATUSES}
    if _is_htmx(request) and request.headers.get("hx-target") == "jobs-table":
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
