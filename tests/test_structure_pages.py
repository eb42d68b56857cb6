"""The structure's API and pages: co-firing partners, the map (in Chromium: it renders, a click
opens the latent), feature groups."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.test_pages_browser import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def structure_db(tmp_path_factory, tiny_sae_dir):
    """(engine, analysis): the tiny SAE published to SQLite with its map, and one explanation."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from store.db import make_engine, upgrade
    from store.models import SAE, Feature
    from trainer.publish import Analysis, publish

    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('structure') / 'atlas.db'}")
    upgrade(engine)
    publish(tiny_sae_dir, "tiny", engine=engine, progress=False, make_map=True)
    with Session(engine) as s, s.begin():
        sae_id = s.scalar(select(SAE.id).where(SAE.name == "tiny"))
        f = s.scalar(select(Feature).where(Feature.sae_id == sae_id, Feature.index == 5))
        f.explanation = "closing brackets of a call"
    yield engine, Analysis.load(tiny_sae_dir)
    engine.dispose()


@pytest.fixture(scope="module")
def client(structure_db):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from store.settings import get_settings

    with TestClient(create_app(engine=structure_db[0], settings=get_settings())) as c:
        yield c


def test_cofiring_api(client, structure_db):
    _, a = structure_db
    i = next(i for i in range(len(a.partners.counts)) if len(a.partners.stats(i)) >= 2)
    r = client.get(f"/api/v1/saes/tiny/features/{i}/cofiring?k=2")
    assert r.status_code == 200
    body = r.json()
    want = a.partners.stats(i)
    assert body["computed"] and body["available"] == len(want) and len(body["items"]) == 2
    for it, (j, n, pji, pij, lift) in zip(body["items"], want):
        assert (it["index"], it["n_together"]) == (j, n)
        assert it["lift"] == pytest.approx(lift, rel=1e-3) and it["p_partner_given_this"] == pytest.approx(pji, rel=1e-3)
        assert it["links"]["page"] == f"/saes/tiny/features/{j}"
    assert client.get("/api/v1/saes/tiny/features/128/cofiring").status_code == 404  # the SAE has 128 latents
    assert client.get("/api/v1/saes/nope/features/1/cofiring").status_code == 404
    assert client.get(f"/api/v1/saes/tiny/features/{i}/cofiring?k=0").status_code == 422


def test_map_and_groups_api(client, structure_db):
    _, a = structure_db
    m = client.get("/api/v1/saes/tiny/map").json()
    assert m["points"]["index"] == list(range(128)) and m["clusters"]
    assert m["points"]["explanation"][5] == "closing brackets of a call"
    g = client.get("/api/v1/saes/tiny/groups?per_page=5").json()
    assert g["total"] == len(a.groups["groups"])
    if g["total"]:
        one = client.get("/api/v1/saes/tiny/groups/0").json()
        assert one["latents"] == a.groups["groups"][0]["latents"]
        assert len(one["scatter"]["token_text"]) == len(one["scatter"]["x"])
    assert client.get(f"/api/v1/saes/tiny/groups/{g['total']}").status_code == 404
    assert client.get("/api/v1/saes/tiny/groups/-1").status_code == 422


def test_pages_show_structure(client, structure_db):
    _, a = structure_db
    i = next(i for i in range(len(a.partners.counts)) if a.partners.stats(i))
    page = client.get(f"/saes/tiny/features/{i}").text
    assert 'id="cofiring"' in page and f'href="/saes/tiny/features/{a.partners.stats(i)[0][0]}"' in page
    assert 'class="chart minimap"' in page and f"/saes/tiny/map?focus={i}" in page
    assert client.get("/saes/tiny/map").status_code == 200
    assert client.get("/saes/tiny/groups").status_code == 200
    if a.groups["groups"]:
        assert 'class="chart scatter"' in client.get("/saes/tiny/groups/0").text
    assert client.get("/saes/tiny/groups/999").status_code == 404


@pytest.mark.browser
def test_map_renders_and_a_click_opens_the_latent(structure_db):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"headless Chromium is not installed at {CHROMIUM}")
    import uvicorn
    from playwright.sync_api import sync_playwright

    from app.main import create_app
    from store.settings import get_settings
    from tests.helpers import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=structure_db[0], settings=get_settings()),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            pg = b.new_page(viewport={"width": 1200, "height": 900})
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))  # script errors (htmx's CDN is blocked here: not one)
            pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base) else r.abort())
            pg.goto(f"{base}/saes/tiny/map?focus=5")
            pg.wait_for_selector("#atlasmap[data-ready='1']", timeout=15000)
            assert "128 latents" in pg.inner_text("#mapstatus")
            # the canvas has been painted: some pixels are not background
            painted = pg.evaluate("""() => { const c = document.getElementById('atlasmap');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let k = 0;
                for (let i = 3; i < d.length; i += 4) if (d[i] > 0) k++; return k; }""")
            assert painted > 500
            pg.fill("#mapsearch", "closing brackets")
            assert "1 of 128" in pg.inner_text("#mapstatus")
            x, y = pg.evaluate("() => window.atlasMap.screenOf(5)")
            box = pg.locator("#atlasmap").bounding_box()
            pg.mouse.move(box["x"] + x, box["y"] + y)
            assert "closing brackets" in pg.inner_text("#maptip")
            pg.mouse.click(box["x"] + x, box["y"] + y)
            pg.wait_for_url(f"{base}/saes/tiny/features/5", timeout=10000)
            assert not errors
            b.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_map_command_remakes_the_map_with_current_explanations(structure_db, client):
    """`sae-atlas map NAME --seed 1`: a new layout from the store, labels from the stored
    explanations, and a new SAE version; a bad setting is one line."""
    from sqlalchemy.orm import Session

    from app.cli import main
    from store.models import SAE
    from trainer.structure.layout import MapConfig
    from trainer.structure.remap import remap_published

    from store.models import Feature

    engine, _ = structure_db
    before = client.get("/api/v1/saes/tiny/map").json()
    members = [i for i, c in zip(before["points"]["index"], before["points"]["cluster"]) if c == 0]
    with Session(engine) as s, s.begin():  # explanations written since publish: the labels must follow them
        version = s.query(SAE).one().version
        for f in s.query(Feature).filter(Feature.index.in_(members)):
            f.explanation = "closing brackets of a call"
    out = remap_published("tiny", MapConfig(seed=1), engine=engine)
    after = client.get("/api/v1/saes/tiny/map").json()
    assert after["config"]["seed"] == 1 and out["latents"] == 128
    assert after["points"]["x"] != before["points"]["x"]
    now = after["points"]["cluster"][members[0]]
    assert now >= 0
    words = next(c["words"] for c in after["clusters"] if c["id"] == now)
    assert words[0] in {"closing", "brackets", "call"}
    with Session(engine) as s:
        assert s.query(SAE).one().version != version
    assert main(["map", "tiny", "--resolution", "-1"]) != 0  # rejected before any work
