"""Training-run pages: the list, the new-run form, a run's page with live curves, cancelling.

Writes follow the explanation form's rule: every form carries a CSRF token, and acts with a write
key typed into it or with the key of the browser's sign-in session, so a cross-site form cannot
submit or cancel a run. Every form is
a plain POST that works without JavaScript; htmx only refreshes the live part of a run's page
(status, progress, curves, log) every 2 s while the run is queued or running, and stops once the
fragment it gets back describes a finished run.
"""

from __future__ import annotations

import math
import re
import typing
from datetime import datetime
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.api_error import ApiError
from app.deps import get_session, read_access
from store.errors import AtlasError
from store.models import SAEStatus, TrainingRun, utcnow
from app.runs import service
from app.runs.spec import Architecture, RunSpec, public_spec
from app.security import CSRF_FIELD, csrf_valid
from app.web import charts
from app.web.rendering import forbidden_form, form_key, is_htmx, num, pct, render

router = APIRouter(include_in_schema=False, dependencies=[Depends(read_access)])

RunId = Path(ge=1, le=2**31 - 1)
PER_PAGE = 50
NO_STORE = {"Cache-Control": "no-store"}
ARCHITECTURES = typing.get_args(Architecture)
# (metric, chart title, log axis: None = automatic)
CURVES = (("loss", "loss", None, num), ("fvu", "FVU", False, num), ("l0", "L0", False, num),
          ("dead_frac", "dead fraction", False, lambda v: pct(v, 1)))

# The form's fields: name -> (label, kind). Kinds: text, int (one whole number; 2M, 1e6 and
# 1_000 are fine), tokens (an int that also takes k/M/B), ints (comma-separated whole numbers),
# list (comma-separated text), float, select (RunSpec's Literal choices), yesno (a bool as a no/yes
# select), arch (checkboxes).
FIELDS: dict[str, tuple[str, str]] = {
    "name": ("name", "text"),
    "description": ("description", "text"),
    "model": ("model", "text"),
    "sites": ("sites", "list"),
    "arch": ("architectures", "arch"),
    "width": ("widths", "ints"),
    "k": ("k values", "ints"),
    "tokens": ("training tokens", "tokens"),
    "batch_size": ("batch size", "int"),
    "corpus": ("corpus", "text"),
    "analyze_tokens": ("analysis tokens", "tokens"),
    "gpus": ("GPUs", "int"),
    "priority": ("priority", "int"),
    "lr": ("learning rate", "float"),
    "l1_coefficient": ("L1 coefficient", "float"),
    "l0_coefficient": ("L0 coefficient", "float"),
    "ctx_len": ("context length", "int"),
    "text_field": ("text field", "text"),
    "eval_fraction": ("eval fraction", "float"),
    "seed": ("seed", "int"),
    "analyze_split": ("analysis split", "select"),
    "device": ("device", "text"),
    "lm_dtype": ("LM dtype", "select"),
    "skip_connection": ("skip-transcoders", "yesno"),
    "set_publish": ("transcoder set publish", "select"),
}
YESNO = ("no", "yes")
CHOICES = {name: typing.get_args(RunSpec.model_fields[name].annotation) if kind == "select" else YESNO
           for name, (_, kind) in FIELDS.items() if kind in ("select", "yesno")}
MAX_VALUE_LEN = 2000


# --- helpers -----------------------------------------------------------------------------------

def _fmt_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def form_values(spec: dict | None = None) -> dict[str, typing.Any]:
    """The form's text for each field: RunSpec's defaults, overridden by `spec` (a copied run)."""
    defaults = RunSpec.model_construct().model_dump()
    spec = {**defaults, **(spec or {})}
    values: dict[str, typing.Any] = {name: YESNO[bool(spec.get(name))] if kind == "yesno" else _fmt_value(spec.get(name))
                                     for name, (_, kind) in FIELDS.items()}
    values["arch"] = list(spec.get("arch") or [])
    return values


def sae_defaults() -> dict[str, typing.Any]:
    """The architecture defaults a blank field stands for, read from their one home (SAEConfig)."""
    import dataclasses

    from trainer.sae.base import SAEConfig

    return {f.name: f.default for f in dataclasses.fields(SAEConfig) if f.default is not dataclasses.MISSING}


_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def _intish(text: str, suffixes: bool = False):
    """'2M', '2_000_000', '2,000,000' and '2e6' as 2000000; anything else goes to pydantic as is
    (so the message says what is wrong with it)."""
    s = text.strip().replace("_", "").replace(" ", "")
    if "," in s and all(len(p) == 3 for p in s.split(",")[1:]):
        s = s.replace(",", "")
    scale = 1
    if suffixes and s[-1:].lower() in _SUFFIXES:
        s, scale = s[:-1], _SUFFIXES[s[-1].lower()]
    try:
        f = float(s) * scale
    except ValueError:
        return text.strip()
    return int(f) if math.isfinite(f) and f.is_integer() else text.strip()


def spec_data(values: dict) -> dict:
    """What RunSpec is given for the submitted form: a blank field means the default."""
    data: dict[str, typing.Any] = {}
    for name, (_, kind) in FIELDS.items():
        raw = values.get(name)
        if kind == "arch":
            data[name] = list(raw or [])
            continue
        text = (raw or "").strip()
        if not text:
            if name == "description":
                data[name] = ""
            continue
        if kind in ("ints", "list"):
            items = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
            data[name] = [_intish(p) for p in items] if kind == "ints" else items
        elif kind in ("int", "tokens"):
            data[name] = _intish(text, suffixes=kind == "tokens")
        elif kind == "yesno":
            data[name] = {"no": False, "yes": True}.get(text, text)
        else:
            data[name] = text
    return data


def validation_reasons(exc: ValidationError) -> list[tuple[str | None, str]]:
    """(field or None, reason) for each problem pydantic found, in the form's words."""
    out = []
    for e in exc.errors()[:20]:
        loc = e.get("loc") or ()
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        field = str(loc[0]) if loc else None
        if field in FIELDS:
            label = FIELDS[field][0]
            if len(loc) > 1 and isinstance(loc[1], int) and FIELDS[field][1] in ("ints", "list", "arch"):
                label += f" (item {loc[1] + 1})"
            msg = f"{label}: {msg}"
        elif field is not None:
            msg = f"{field}: {msg}"
        out.append((field if field in FIELDS else None, msg))
    return out


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _when(dt: datetime | None) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


def best_latest(run: TrainingRun) -> dict | None:
    """The newest record of the run's SAE with the lowest FVU (the only one for a single SAE)."""
    latest = [(name, rec) for name, rec in (run.latest or {}).items() if isinstance(rec, dict)]
    if not latest:
        return None

    def key(item):
        fvu = item[1].get("fvu")
        return (0, fvu) if isinstance(fvu, (int, float)) and math.isfinite(fvu) else (1, 0)

    name, rec = min(latest, key=key)
    return {"sae": name, "n": len(latest), **rec}


def _natural(name: str) -> list:
    """Sort key that puts w512 before w1024."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def live_context(session: Session, run: TrainingRun) -> dict:
    """What the live fragment shows: status, progress, timing, curves, latest metrics, log, SAEs."""
    run = service.public_view(run)
    n_saes = max(1, len(run.latest or {}))
    hist = service.history(session, run.id, max_points=max(50, min(400, 2400 // n_saes)))
    names = sorted(hist, key=_natural)
    label = {n: n or run.name for n in names}  # a single SAE's records may carry no name
    curves = []
    for metric, title, log_y, y_format in CURVES:
        series = {label[n]: [(r["step"], r.get(metric)) for r in hist[n]] for n in names}
        curves.append({"metric": metric, "title": title, "log_y": log_y, "series": series, "y_format": y_format})
    now = utcnow()
    elapsed = ((run.finished_at or now) - run.started_at).total_seconds() if run.started_at else None
    eta = None
    if run.status == "running" and elapsed and 0.01 < (run.progress or 0) < 1:
        eta = elapsed * (1 - run.progress) / run.progress
    saes = service.published_saes(session, run.id)
    latest = sorted((run.latest or {}).items(), key=lambda item: _natural(item[0]))
    colour = {n: charts.series_class(i) for i, n in enumerate(names)}
    return {"run": run, "curves": curves, "legend": [label[n] for n in names], "has_metrics": bool(names),
            "colour": colour,
            "live": run.status in service.LIVE, "elapsed": _duration(elapsed), "eta": _duration(eta) if eta else None,
            "since_heartbeat": _duration((now - run.heartbeat_at).total_seconds()) if run.heartbeat_at else None,
            "latest": latest, "saes": saes, "ready": SAEStatus.ready.value, "when": _when}


def _spec_rows(spec: dict) -> list[tuple[str, str, bool]]:
    """(label, value, is_default) for the config table, in the form's order, then anything else."""
    defaults = RunSpec.model_construct().model_dump()
    rows = []
    for name in list(FIELDS) + [k for k in spec if k not in FIELDS]:
        if name not in spec:
            continue
        value = spec[name]
        label = FIELDS[name][0] if name in FIELDS else name
        text = _fmt_value(value)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
            text = f"{value:,}"
        rows.append((label, text if text != "" else "default", value == defaults.get(name)))
    return rows


async def submitted_form(request: Request) -> dict:
    """The posted form as {field: text} (arch: a list), values clipped to MAX_VALUE_LEN characters."""
    form = await request.form(max_files=0, max_fields=100)
    out: dict[str, typing.Any] = {}
    for name in (*FIELDS, "api_key", CSRF_FIELD):
        if name == "arch":
            out[name] = [str(v)[:50] for v in form.getlist(name)][:10]
        else:
            v = form.get(name)
            out[name] = str(v)[:MAX_VALUE_LEN] if isinstance(v, str) else ""
    return out


# --- pages -------------------------------------------------------------------------------------

@router.get("/runs", response_class=HTMLResponse)
def runs_page(request: Request, status: str | None = Query(None, max_length=20),
              page: int = Query(1, ge=1, le=100_000), session: Session = Depends(get_session)):
    if status not in (None, "", *service.STATUSES):
        raise ApiError(422, "invalid_parameters", "status must be queued, running, done, failed or cancelled")
    runs, total = service.recent(session, PER_PAGE, (page - 1) * PER_PAGE, status or None)
    runs = [service.public_view(r) for r in runs]
    pages_n = max(1, (total + PER_PAGE - 1) // PER_PAGE)
    params = {"status": status} if status else {}
    ctx = {"runs": runs, "total": total, "page": page, "pages": pages_n, "status": status or "",
           "statuses": service.STATUSES, "counts": service.counts(session), "best": best_latest, "when": _when,
           "qs": lambda **kw: urlencode({**params, **kw}), "self_url": "/runs?" + urlencode({**params, "page": page})}
    headers = {**NO_STORE, "Vary": "HX-Request, HX-Target"}
    if is_htmx(request) and request.headers.get("hx-target") == "runs-table":
        return render(request, "_runs_table.html", ctx, headers=headers)
    return render(request, "runs.html", ctx, headers=headers)


def _new_form(request: Request, values: dict, errors: list[tuple[str | None, str]] | None = None,
              status: int = 200) -> HTMLResponse:
    errors = errors or []
    by_field: dict[str, list[str]] = {}
    for field, msg in errors:
        if field:
            by_field.setdefault(field, []).append(msg)
    return render(request, "run_new.html", {"v": values, "errors": errors, "field_errors": by_field,
                                            "archs": ARCHITECTURES, "choices": CHOICES,
                                            "sae_defaults": sae_defaults()}, status=status,
                  headers=NO_STORE)


@router.get("/runs/new", response_class=HTMLResponse)
def new_run_form(request: Request, copy: int | None = Query(None, ge=1, le=2**31 - 1),
                 session: Session = Depends(get_session)):
    """The new-run form with RunSpec's defaults, or with run `copy`'s config (and no name)."""
    spec = None
    if copy is not None:
        spec = {k: v for k, v in public_spec(service.get(session, copy).spec or {}).items() if k != "name"}
    return _new_form(request, form_values(spec))


@router.post("/runs/new", response_class=HTMLResponse)
def create_run(request: Request, form: dict = Depends(submitted_form), session: Session = Depends(get_session)):
    if not csrf_valid(request, form[CSRF_FIELD]):
        return forbidden_form(request)
    values = {k: v for k, v in form.items() if k not in ("api_key", CSRF_FIELD)}  # the key is never echoed back
    # The key first: nothing about the server (which models or corpus files exist) for anyone else.
    key, status, message = form_key(session, request, form["api_key"], "start a training run")
    if key is None:
        return _new_form(request, values, [(None, message)], status)
    try:
        spec = RunSpec.model_validate(spec_data(values))
    except ValidationError as exc:
        return _new_form(request, values, validation_reasons(exc), 422)
    try:
        run = service.submit(session, spec, requested_by=key.name)
    except service.NameTaken as exc:
        session.rollback()
        return _new_form(request, values, [("name", exc.one_line())], 409)
    except AtlasError as exc:
        session.rollback()
        return _new_form(request, values, [(None, exc.one_line())], 422)
    session.commit()
    return RedirectResponse(f"/runs/{run.id}", status_code=303)


def _run_page(request: Request, session: Session, run: TrainingRun, cancel_error: str | None = None,
              status: int = 200) -> HTMLResponse:
    ctx = live_context(session, run)
    ctx.update(spec_rows=_spec_rows(ctx["run"].spec or {}), cancel_error=cancel_error,
               cancelled=request.query_params.get("cancelled") == "1")
    return render(request, "run.html", ctx, status=status, headers=NO_STORE)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: int = RunId, session: Session = Depends(get_session)):
    return _run_page(request, session, service.get(session, run_id))


@router.get("/runs/{run_id}/live", response_class=HTMLResponse)
def run_live(request: Request, run_id: int = RunId, session: Session = Depends(get_session)):
    """The live part of a run's page. Once the run has finished it also replaces the cancel form
    (an htmx out-of-band swap), and carries no polling attribute, so the polling stops."""
    ctx = live_context(session, service.get(session, run_id))
    ctx["fragment"] = True
    return render(request, "_run_live.html", ctx, headers=NO_STORE)


@router.post("/runs/{run_id}/cancel", response_class=HTMLResponse)
def cancel_run(request: Request, run_id: int = RunId, form: dict = Depends(submitted_form),
               session: Session = Depends(get_session)):
    if not csrf_valid(request, form[CSRF_FIELD]):
        return forbidden_form(request)
    run = service.get(session, run_id)
    key, status, message = form_key(session, request, form["api_key"], "cancel a run")
    if key is None:
        return _run_page(request, session, run, message, status)
    if run.status not in service.LIVE:
        return _run_page(request, session, run, f"Run #{run.id} is already {run.status}; only queued or running "
                                                  "runs can be cancelled.", 409)
    try:
        run = service.cancel(session, run_id)
    except AtlasError as exc:
        session.rollback()
        return _run_page(request, session, service.get(session, run_id), exc.one_line(), 409)
    if run.status != "cancelled":  # it finished between the read and the conditional update
        session.rollback()
        return _run_page(request, session, run, f"Run #{run.id} is already {run.status}; it was not cancelled.", 409)
    session.commit()
    return RedirectResponse(f"/runs/{run.id}?cancelled=1", status_code=303)
