"""What every HTML page module shares: the templates and their filters, rendering with the CSRF
token, the error page, example rows, and the form-key check. Pages import from here, never from
each other's modules.
"""

from __future__ import annotations

import math
import operator
import typing

import numpy as np
from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from sqlalchemy.orm import Session

import store
from app import __version__
from app.security import CSRF_FIELD, can_write, csrf_token, session_key, set_csrf_cookie, verify_key
from app.web import charts
from store.paths import resource_dir

templates = Jinja2Templates(directory=str(resource_dir("templates")))
env = templates.env
env.globals.update(version=__version__, charts=charts)


def _bad(x) -> bool:
    return x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))


def pct(x, digits=1):
    if _bad(x):
        return "–"
    v = 100 * x
    if v != 0 and abs(v) < 10 ** -digits:
        return f"<{10 ** -digits:g}%"
    return f"{v:.{digits}f}%"


def num(x, digits=3):
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


env.filters.update(pct=pct, num=num, score=_score, density=_density, density_short=_density_short, log10=_log10,
                   vis=store.visible, chip=store.chip)

# The class of an active token by level (activation / scale in tenths), plus 10 for the peak token.
_TOKEN_CLASSES = [f"t a{i}" for i in range(10)] + [f"t a{i} pk" for i in range(10)]
# Tooltip text by activation: examples store float16 activations, so there are few distinct values
# and each is formatted once per process rather than once per token of every page.
_TITLES: dict[float, str] = {}


def _title(v: float) -> str:
    t = _TITLES.get(v)
    if t is None:
        t = f"{v:.3g}"
        if len(_TITLES) < 200_000:
            _TITLES[v] = t
    return t


def _examples_spans(examples: list[tuple], vocab: store.Vocab, scale: float) -> list[str]:
    """The token spans of many examples [(ids, acts, peak)] in one vectorised pass.

    Active tokens carry their value in `title` (a native tooltip without JavaScript; atlas.js shows
    a nicer one) and a colour class a0..a9 (activation / scale in tenths); inactive tokens are
    plain spans prebuilt once per vocabulary, which keeps a page of ~90 examples small and fast."""
    if not examples:
        return []
    lengths = np.array([len(e[0]) for e in examples], dtype=np.int64)
    ids = np.concatenate([e[0] for e in examples]).astype(np.int64, copy=False)
    acts = np.concatenate([e[1] for e in examples]).astype(np.float32, copy=False)
    html, spans = vocab.html, vocab.spans
    n_vocab = len(html)
    if len(ids) == 0:
        return [""] * len(examples)
    in_vocab = int(ids.min()) >= 0 and int(ids.max()) < n_vocab
    if in_vocab:
        out = list(operator.itemgetter(*ids.tolist())(spans)) if len(ids) > 1 else [spans[int(ids[0])]]
    else:
        out = [spans[t] if 0 <= t < n_vocab else f'<span class="t">&lt;{t}&gt;</span>' for t in ids.tolist()]
    ends = np.cumsum(lengths)
    peaks = np.array([e[2] for e in examples], dtype=np.int64)
    has_peak = (peaks >= 0) & (peaks < lengths)
    is_peak = np.zeros(len(ids), dtype=bool)
    is_peak[(ends - lengths + peaks)[has_peak]] = True
    inv = 10.0 / scale if scale and scale > 0 else 10.0
    fired = acts > 0
    active = np.flatnonzero(fired)
    levels = np.minimum(9, (acts[active] * inv).astype(np.int64)) + 10 * is_peak[active]
    classes = _TOKEN_CLASSES
    for i, v, t, lv in zip(active.tolist(), acts[active].tolist(), ids[active].tolist(), levels.tolist()):
        label = html[t] if in_vocab or 0 <= t < n_vocab else f"&lt;{t}&gt;"
        out[i] = f'<span class="{classes[lv]}" title="{_title(v)}">{label}</span>'
    for i in np.flatnonzero(is_peak & ~fired).tolist():
        t = int(ids[i])
        out[i] = f'<span class="t pk" title="0">{html[t] if 0 <= t < n_vocab else t}</span>'
    result = []
    pos = 0
    for end in ends.tolist():
        result.append("".join(out[pos:end]))
        pos = end
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
    return Markup("\n".join(_example_row(ex, html) for ex, html in zip(examples, spans)))


# Cached pages are rendered with this in place of the CSRF token, put in per response.
CSRF_PLACEHOLDER = "__csrf_token_placeholder__"


def render_bytes(request: Request, name: str, context: dict) -> bytes:
    s = request.app.state.settings
    ctx = {"request": request, "htmx_url": s.htmx_url, "htmx_integrity": s.htmx_integrity,
           "htmx": is_htmx(request), "csrf_field": CSRF_FIELD, **context}
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
        if is_htmx(request) and not request.headers.get("hx-history-restore-request"):
            return HTMLResponse(f'<p class="notice err" role="alert">{escape(message)}</p>', status_code=status)
        ctx = {"status": status, "message": message, "title": {401: "API key needed", 403: "Not allowed",
                                                                  404: "Not found", 422: "Bad request",
                                                                  503: "Unavailable"}.get(status, "Error")}
        if status in (401, 403) and request.method == "GET" and not request.url.path.startswith("/login"):
            ctx["login_next"] = request.url.path
        return render(request, "error.html", ctx, status=status)
    except Exception:  # the error page itself must never fail with a traceback
        return HTMLResponse(f"<!doctype html><title>{status}</title><h1>{status}</h1>", status_code=status)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"
