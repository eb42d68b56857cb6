"""Training-run pages without a browser: the runs list, a run's page with its curves and live
fragment, the new-run form (success and every kind of refusal), cancelling from the page, and the
SAE page's link back to its run. Runs and metrics are inserted directly; no trainer runs here.
(tests/test_pages_browser.py drives the same pages in headless Chromium.)"""

from __future__ import annotations

import math
import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.models import SAE, RunMetric, TrainingRun, utcnow
from app.web import charts
from tests.test_pages import check_page, make_client, make_key

SPEC = {"name": None, "description": "", "model": "smollm2-135m", "sites": ["resid_post.3"], "arch": ["topk"],
        "width": [256], "k": [16], "tokens": 40960, "batch_size": 1024, "corpus": "pydoc", "gpus": 1, "priority": 0}
POLL = 'hx-trigger="every 2s"'
XSS = '<script>alert("x")</script>'


def add_run(engine, name: str, status: str = "running", metrics: dict[str, list[dict]] | None = None, **kw) -> int:
    """A run row (and its metric records: {sae: [{step, loss, ...}]}) as a worker would leave it."""
    now = utcnow()
    spec = {**SPEC, "name": name, **kw.pop("spec", {})}
    values = {"name": name, "spec": spec, "status": status, "total_steps": 40,
              "attempts": 1 if status != "queued" else 0, "created_at": now - timedelta(minutes=5)}
    if status != "queued":
        values.update(started_at=now - timedelta(minutes=4), heartbeat_at=now, phase="train" if status == "running" else None)
    if status in ("done", "failed", "cancelled"):
        values["finished_at"] = now
    values.update(kw)
    with Session(engine) as s, s.begin():
        run = TrainingRun(**values)
        s.add(run)
        s.flush()
        add_metrics(s, run, metrics or {})
        return run.id


def add_metrics(s: Session, run: TrainingRun, metrics: dict[str, list[dict]]) -> None:
    latest = dict(run.latest or {})
    for sae, recs in metrics.items():
        for r in recs:
            s.add(RunMetric(run_id=run.id, sae=sae, attempt=1, tokens=r["step"] * 1024, **r))
        if recs:
            # PostgreSQL's JSON has no NaN: like the worker, keep only numbers there
            latest[sae] = {"tokens": recs[-1]["step"] * 1024,
                           **{k: v if v is None or math.isfinite(v) else None for k, v in recs[-1].items()}}
    run.latest = latest


def curve(steps, fvu0: float = 0.9) -> list[dict]:
    return [{"step": s, "loss": 10.0 / (1 + s), "fvu": fvu0 / (1 + 0.1 * s), "l0": 16.0, "dead_frac": 0.5 / (1 + s),
             "lr": 1e-3} for s in steps]


CSRF = "test-browser-csrf-token-0123456789"  # this test's browser: its CSRF cookie and forms agree


def browser(c):
    """The client as a browser that has loaded a page: it holds a CSRF cookie."""
    c.cookies.set("atlas_csrf", CSRF)
    return c


def form(**over) -> dict:
    data = {"csrf_token": CSRF, "name": "", "description": "", "model": "smollm2-135m", "sites": "resid_post.3", "arch": ["topk"],
            "width": "256", "k": "16", "tokens": "40k", "batch_size": "1024", "corpus": "pydoc",
            "analyze_tokens": "10_000", "gpus": "1", "priority": "0", "lr": "", "api_key": ""}
    data.update(over)
    return data


def run_count(engine) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(TrainingRun))


# --- the charts ---------------------------------------------------------------------------------

def test_line_chart_handles_gaps_single_points_and_nothing():
    assert "no data" in charts.line_chart({})
    assert "no data" in charts.line_chart({"a": [(1, None), (2, float("nan"))]})
    one = charts.line_chart({"a": [(5, 0.3)]}, label="FVU")
    assert "<svg" in one and "<path" not in one and 'class="dot s0"' in one  # a lone point is a dot
    gappy = charts.line_chart({"a": [(0, 1.0), (1, 0.8), (2, None), (3, float("nan")), (4, 0.5), (5, 0.4)],
                               "b": [(0, 2.0), (5, float("inf"))]})
    d = re.search(r'<path class="line s0" d="([^"]+)"', gappy).group(1)
    assert d.count("M") == 2  # the missing values break the line instead of bridging or crashing
    assert 'class="dot s1"' in gappy and "nan" not in gappy.lower().replace("nodata", "")
    flat = charts.line_chart({"a": [(0, 3.0), (1, 3.0)]})
    assert '<path class="line s0"' in flat  # a constant series still gets a y range
    log = charts.line_chart({"a": [(0, 1000.0), (10, 1.0)]}, label="loss", log_y=None)
    assert "log scale" in log
    named = charts.line_chart({XSS: [(0, 1.0), (1, 2.0)]})
    assert "<script>" not in named and "&lt;script&gt;" in named
    assert "<script>" not in charts.legend([XSS]) and 'class="line s0"' in charts.legend(["a"])
    assert charts.series_class(3) == "s3" and charts.series_class(13) == "s3 d1"


# --- list ---------------------------------------------------------------------------------------

def test_runs_list_page(engine):
    running = add_run(engine, "l3-live", metrics={"": curve(range(0, 30, 10))}, step=20, progress=0.42)
    failed = add_run(engine, "l3-broken", status="failed", error="CUDA out of memory")
    add_run(engine, "l3-done", status="done", progress=1.0, step=40, metrics={"": curve([0, 40])},
            spec={"description": XSS})
    with make_client(engine) as c:
        r = c.get("/runs")
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        check_page(r)
        t = r.text
        assert '<a href="/runs">Runs</a>' in t  # the nav link
        for name in ("l3-live", "l3-broken", "l3-done"):
            assert name in t
        assert f'href="/runs/{running}"' in t and f'href="/runs/{failed}"' in t
        assert t.count("<progress") == 3 and "42%" in t and "20 / 40" in t
        assert 'class="pill st-failed">failed' in t and "resid_post.3" in t and "topk · 256 · 16" in t
        assert '<td class="r">0.3</td>\n    <td class="r">16</td>' in t  # latest FVU and L0 of the live run
        assert "&lt;script&gt;" in t and XSS not in t
        assert 'hx-get="/runs?page=1"' in t and 'href="/runs/new"' in t
        only = c.get("/runs", params={"status": "failed"})
        assert "l3-broken" in only.text and "l3-live" not in only.text and "l3-done" not in only.text
        part = c.get("/runs", headers={"HX-Request": "true", "HX-Target": "runs-table"})
        assert "<html" not in part.text and "<table" in part.text and "l3-live" in part.text
        assert c.get("/runs", params={"status": "bogus"}).status_code == 422
        assert c.get("/runs", params={"page": "0"}).status_code == 422
        empty = c.get("/runs", params={"status": "cancelled"})
        assert "No runs cancelled" in empty.text


# --- a run's page -------------------------------------------------------------------------------

def test_run_page_config_curves_and_log(engine):
    sweep = {"resid_post.3-topk-w256-k16": curve(range(0, 50, 5)),
             "resid_post.3-topk-w512-k16": curve(range(0, 50, 5), fvu0=0.7)
             + [{"step": 55, "loss": None, "fvu": float("nan"), "l0": None, "dead_frac": None, "lr": None}],
             "resid_post.3-topk-w1024-k16": curve([0])}  # one point so far
    run_id = add_run(engine, "sweep-a", metrics=sweep, step=45, total_steps=60, progress=0.5, resumed_from_step=20, attempts=2,
                     log_tail=f"step 45 loss 0.2\n{XSS}\n", spec={"width": [256, 512, 1024], "description": XSS})
    with make_client(engine) as c:
        r = c.get(f"/runs/{run_id}")
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        check_page(r)  # also proves that the log, description and SAE names were escaped
        t = r.text
        assert f"Run #{run_id} · sweep-a" in t and 'class="pill st-running">running' in t
        assert "45 / 60" in t
        assert "resumed from step" in t and ">20<" in t and "2 / 3" in t
        assert t.count('<svg class="chart lines"') == 4
        for metric in ("loss", "fvu", "l0", "dead_frac"):
            fig = re.search(rf'<figure class="curve curve-{metric}">(.*?)</figure>', t, re.DOTALL).group(1)
            assert '<path class="line s0"' in fig and '<path class="line s1"' in fig, metric
            assert 'class="dot s2"' in fig  # the one-point SAE is a dot, not a missing line
        assert 'class="chartlegend"' in t and t.count("resid_post.3-topk-w512-k16") >= 2
        assert "<title>resid_post.3-topk-w256-k16</title>" in t
        assert '<pre class="logtail">step 45 loss 0.2\n&lt;script&gt;' in t
        assert XSS not in t
        # config table
        assert re.search(r"<th>widths</th><td[^>]*>256, 512, 1024</td>", t)
        assert re.search(r"<th>training tokens</th><td[^>]*>40,960</td>", t)
        # live: polls its fragment, and says how to refresh without JavaScript
        assert f'hx-get="/runs/{run_id}/live" {POLL} hx-swap="outerHTML"' in t
        assert f'<a href="/runs/{run_id}">refresh</a>' in t
        assert f'action="/runs/{run_id}/cancel"' in t and 'name="api_key"' in t
        assert f'href="/runs/new?copy={run_id}"' in t
        assert c.get("/runs/999999").status_code == 404
        assert c.get("/runs/0").status_code == 422
        assert c.get("/runs/abc").status_code == 422


def test_failed_run_shows_its_error_and_does_not_poll(engine):
    run_id = add_run(engine, "broke", status="failed", metrics={"": curve(range(5))}, attempts=3,
                     error=f"trainer exited with 1: {XSS} CUDA out of memory")
    with make_client(engine) as c:
        r = c.get(f"/runs/{run_id}")
        assert r.status_code == 200
        check_page(r)
        t = r.text
        assert re.search(r'<div class="notice err runerror" role="alert"><b>The run failed:</b><pre>trainer exited with 1: '
                         r'&lt;script&gt;.*CUDA out of memory</pre>', t)
        assert "hx-trigger" not in t and "/live" not in t  # nothing polls a finished run
        assert f'action="/runs/{run_id}/cancel"' not in t and "nothing to cancel" in t
        assert t.count('<svg class="chart lines"') == 4  # its curves are still there
        # the fragment of a finished run: no polling, and it replaces the cancel form out of band
        live = c.get(f"/runs/{run_id}/live", headers={"HX-Request": "true"})
        assert live.status_code == 200 and "<html" not in live.text and "hx-trigger" not in live.text
        assert 'id="run-cancel" hx-swap-oob="true"' in live.text and "The run failed" in live.text
    # an error from an earlier attempt of a run that is running again is shown, but not as a failure
    retry = add_run(engine, "retrying", error="worker lost", attempts=2)
    with make_client(engine) as c:
        t = c.get(f"/runs/{retry}").text
        assert "An earlier attempt failed" in t and "worker lost" in t and "The run failed" not in t


def test_live_fragment_follows_the_run(engine):
    run_id = add_run(engine, "live-1", metrics={"": curve(range(0, 20, 5))}, step=15, progress=0.3)
    with make_client(engine) as c:
        r = c.get(f"/runs/{run_id}/live", headers={"HX-Request": "true"})
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        t = r.text
        assert t.startswith('<div id="run-live"') and "<html" not in t and POLL in t
        assert "15 / 40" in t and t.count('<svg class="chart lines"') == 4 and "hx-swap-oob" not in t
        before = re.search(r'<path class="line s0" d="([^"]+)"', t).group(1)
        with Session(engine) as s, s.begin():
            run = s.get(TrainingRun, run_id)
            add_metrics(s, run, {"": curve(range(20, 40, 5))})
            run.step, run.progress, run.phase = 35, 0.7, "train"
            run.log_tail = "step 35"
        t = c.get(f"/runs/{run_id}/live").text
        assert "35 / 40" in t and "70.0%" in t and "step 35" in t and POLL in t
        after = re.search(r'<path class="line s0" d="([^"]+)"', t).group(1)
        assert after.count("L") > before.count("L")
        with Session(engine) as s, s.begin():
            s.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(
                status="done", progress=1.0, step=40, phase=None, finished_at=utcnow()))
        done = c.get(f"/runs/{run_id}/live").text
        assert "hx-trigger" not in done and 'class="pill st-done">done' in done and "hx-swap-oob" in done
        assert c.get("/runs/424242/live").status_code == 404


def test_queued_run_without_metrics(engine):
    run_id = add_run(engine, "waiting", status="queued")
    with make_client(engine) as c:
        r = c.get(f"/runs/{run_id}")
        assert r.status_code == 200
        check_page(r)
        assert "No training metrics yet" in r.text and "not started yet" in r.text and POLL in r.text
        assert "Nothing logged yet" in r.text and "<svg class=\"chart" not in r.text


# --- the new-run form ---------------------------------------------------------------------------

def test_new_run_form_submits_a_run(engine):
    key = make_key(engine, "former")
    with make_client(engine) as c:
        browser(c)
        r = c.get("/runs/new")
        assert r.status_code == 200
        check_page(r)
        t = r.text
        assert 'method="post" action="/runs/new"' in t and 'name="api_key"' in t and 'type="password"' in t
        assert 'name="model" value="smollm2-135m"' in t and 'name="sites" value="resid_post.15"' in t
        assert 'value="topk" checked' in t and 'value="jumprelu">' in t
        ok = c.post("/runs/new", data=form(name="my-l3", description="first try", sites="resid_post.3, mlp_out.2",
                                           arch=["topk", "relu"], width="256,512", k="16", tokens="40k",
                                           lr="0.0005", api_key=key))
        assert ok.status_code == 303, ok.text
        run_id = int(re.fullmatch(r"/runs/(\d+)", ok.headers["location"]).group(1))
        with Session(engine) as s:
            run = s.get(TrainingRun, run_id)
            assert run.name == "my-l3" and run.status == "queued" and run.requested_by == "former"
            spec = run.spec
            assert spec["sites"] == ["resid_post.3", "mlp_out.2"] and spec["arch"] == ["topk", "relu"]
            assert spec["width"] == [256, 512] and spec["k"] == [16] and spec["tokens"] == 40_000
            assert spec["analyze_tokens"] == 10_000 and math.isclose(spec["lr"], 5e-4)
            assert spec["description"] == "first try"
        page = c.get(ok.headers["location"])
        assert page.status_code == 200 and "my-l3" in page.text and POLL in page.text
        # copying a run's config into the form (without its name)
        copy = c.get("/runs/new", params={"copy": run_id})
        assert 'name="sites" value="resid_post.3, mlp_out.2"' in copy.text and 'name="width" value="256, 512"' in copy.text
        assert 'name="name" value=""' in copy.text and 'value="relu" checked' in copy.text
        assert c.get("/runs/new", params={"copy": 999999}).status_code == 404
        # no name: the run is named after its id
        plain = c.post("/runs/new", data=form(api_key=key))
        assert plain.status_code == 303
        new_id = int(plain.headers["location"].rsplit("/", 1)[1])
        with Session(engine) as s:
            assert s.get(TrainingRun, new_id).name == f"run-{new_id}"


def test_new_run_form_refusals(engine):
    key = make_key(engine, "former")
    with make_client(engine) as c:
        browser(c)
        n = run_count(engine)
        # without the CSRF token (another site's form): refused before anything else
        r = c.post("/runs/new", data={**form(name="forged", api_key=key), "csrf_token": ""})
        assert r.status_code == 403 and "another site" in r.text
        # no key / a wrong key: refused before anything else, the form comes back with its values
        r = c.post("/runs/new", data=form(name="keyless", width="32", k="64"))
        assert r.status_code == 401 and "An API key is needed" in r.text
        check_page(r)
        assert 'name="name" value="keyless"' in r.text and "k=64" not in r.text
        r = c.post("/runs/new", data=form(name="keyless", api_key="atlas_wrong"))
        assert r.status_code == 403 and "not valid" in r.text and "atlas_wrong" not in r.text
        # k >= width
        r = c.post("/runs/new", data=form(name="too-wide", width="32", k="64", api_key=key))
        assert r.status_code == 422
        check_page(r)
        assert "k=64 must be smaller than width=32" in r.text
        assert 'name="name" value="too-wide"' in r.text and 'name="width" value="32"' in r.text
        assert key not in r.text  # the key is never echoed back
        # a site the model does not have (smollm2-135m has 30 blocks)
        r = c.post("/runs/new", data=form(name="deep", sites="resid_post.99", api_key=key))
        assert r.status_code == 422 and "unknown site" in r.text and "resid_post.99" in r.text
        assert 'name="sites" value="resid_post.99"' in r.text
        # field-level problems are listed and marked next to their fields
        r = c.post("/runs/new", data=form(width="abc", arch=[], gpus="0", api_key=key))
        assert r.status_code == 422
        assert "widths (item 1)" in r.text and "architectures" in r.text and "GPUs" in r.text
        assert r.text.count('class="fielderr err small"') >= 3
        r = c.post("/runs/new", data=form(name="bad name!", api_key=key))
        assert r.status_code == 422 and "name:" in r.text
        # corpora: only under the corpus roots, and the refusal never tells whether a path exists
        outside = [c.post("/runs/new", data=form(corpus=path, api_key=key)) for path in ("/no/such/corpus.txt", "/etc/passwd")]
        assert [r.status_code for r in outside] == [422, 422]
        assert all("is not under the folders training runs may read" in r.text for r in outside)
        assert outside[0].text.replace("/no/such/corpus.txt", "X") == outside[1].text.replace("/etc/passwd", "X")
        r = c.post("/runs/new", data=form(corpus="./no-such-corpus.txt", api_key=key))  # inside the roots
        assert r.status_code == 422 and "does not exist" in r.text
        r = c.post("/runs/new", data=form(description=XSS, width="8", k="16", api_key=key))
        assert r.status_code == 422 and XSS not in r.text and "&lt;script&gt;" in r.text
        check_page(r)
        assert run_count(engine) == n  # nothing was queued
        # a name already in use
        assert c.post("/runs/new", data=form(name="taken", api_key=key)).status_code == 303
        r = c.post("/runs/new", data=form(name="taken", api_key=key))
        assert r.status_code == 409 and "already used" in r.text
        assert run_count(engine) == n + 1


# --- cancelling ---------------------------------------------------------------------------------

def test_cancel_from_the_page(engine):
    key = make_key(engine, "canceller")
    run_id = add_run(engine, "stop-me", metrics={"": curve(range(3))})
    with make_client(engine) as c:
        browser(c)
        url = f"/runs/{run_id}/cancel"
        assert c.post(url, data={"api_key": key}).status_code == 403  # no CSRF token
        r = c.post(url, data={"api_key": "", "csrf_token": CSRF})
        assert r.status_code == 401 and "An API key is needed to cancel" in r.text
        check_page(r)
        assert c.post(url, data={"api_key": "nope", "csrf_token": CSRF}).status_code == 403
        with Session(engine) as s:
            assert s.get(TrainingRun, run_id).status == "running"
        r = c.post(url, data={"api_key": key, "csrf_token": CSRF})
        assert r.status_code == 303 and r.headers["location"] == f"/runs/{run_id}?cancelled=1"
        with Session(engine) as s:
            run = s.get(TrainingRun, run_id)
            assert run.status == "cancelled" and run.finished_at is not None
        page = c.get(r.headers["location"])
        assert "was cancelled" in page.text and POLL not in page.text and 'class="pill st-cancelled"' in page.text
        again = c.post(url, data={"api_key": key, "csrf_token": CSRF})
        assert again.status_code == 409 and "already cancelled" in again.text
        check_page(again)
        assert c.post("/runs/999999/cancel", data={"api_key": key, "csrf_token": CSRF}).status_code == 404
    done = add_run(engine, "finished", status="done")
    with make_client(engine) as c:
        browser(c)
        r = c.post(f"/runs/{done}/cancel", data={"api_key": key, "csrf_token": CSRF})
        assert r.status_code == 409 and "already done" in r.text


# --- the SAE page -------------------------------------------------------------------------------

def test_sae_page_links_back_to_its_run(published):
    engine, name = published
    with make_client(engine) as c:
        assert "Trained by run" not in c.get(f"/saes/{name}").text
    run_id = add_run(engine, "made-tiny", status="done", progress=1.0, metrics={"": curve(range(3))})
    with Session(engine) as s, s.begin():
        s.execute(update(SAE).where(SAE.name == name).values(run_id=run_id))
    with make_client(engine) as c:
        r = c.get(f"/saes/{name}")
        assert r.status_code == 200
        assert f'<a class="runlink" href="/runs/{run_id}">Trained by run #{run_id}</a>' in r.text
        run_page = c.get(f"/runs/{run_id}").text
        assert f'<a href="/saes/{name}">{name}</a>' in run_page and "Published SAEs" in run_page


def test_form_covers_every_runspec_field():
    from app.runs.spec import RunSpec
    from app.web.run_pages import FIELDS, form_values, spec_data

    assert set(FIELDS) == set(RunSpec.model_fields)  # a new RunSpec field needs a place in the form
    assert RunSpec.model_validate(spec_data(form_values())) == RunSpec()  # the blank form is the default run


@pytest.mark.parametrize("text,expected", [("2M", 2_000_000), ("500k", 500_000), ("2_000", 2000), ("2,000", 2000),
                                           ("2e6", 2_000_000), ("1.5", "1.5"), ("abc", "abc")])
def test_number_parsing(text, expected):
    from app.web.run_pages import _intish

    assert _intish(text, suffixes=True) == expected
