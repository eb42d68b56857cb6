def test_published_sae_is_readable(published):
    from fastapi.testclient import TestClient

    from app.main import create_app

    engine, name = published
    client = TestClient(create_app(engine=engine))
    r = client.get(f"/api/v1/saes/{name}/features/3")
    assert r.status_code == 200
    body = r.json()
    assert body["index"] == 3
    assert client.get(f"/saes/{name}/features/3").status_code == 200
