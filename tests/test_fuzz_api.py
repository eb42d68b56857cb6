"""Every operation of the live OpenAPI schema, fuzzed by schemathesis on SQLite and PostgreSQL.

For each operation, a fixed number of generated requests (hypothesis, derandomized: the same
requests on every run) are sent with a write key to the app over ASGI; no response may be a 5xx,
and every documented response must match its schema (response models on every endpoint), with the
content type it declares. The live endpoints reach a real inference service (the tiny model, on a
Unix socket), so their generated requests run the model rather than meeting "service not running"."""

from __future__ import annotations

import pytest

EXAMPLES_PER_OPERATION = 12


def test_every_operation_survives_generated_requests(published, tmp_path, one_torch_thread):
    from sqlalchemy.orm import Session

    from app.inference.service import create_service_app
    from app.main import create_app
    from app.security import create_key
    from tests.live_support import live_settings, serving

    engine, name = published
    with Session(engine) as s, s.begin():
        key = create_key(s, "fuzzer")
    sock = tmp_path / "inference.sock"
    service = create_service_app(live_settings(tmp_path, f"unix:{sock}"), db_engine=engine)
    with serving(service, uds=str(sock)):
        fuzz_all(create_app(engine=engine, settings=live_settings(tmp_path, f"unix:{sock}")), key)


def fuzz_all(app, key: str) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 16
    seen: dict[str, set[int]] = {}

    for operation in operations:
        @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call_and_validate(headers={"Authorization": f"Bearer {key}"},
                                              checks=[not_a_server_error, response_schema_conformance,
                                                      content_type_conformance])
            seen.setdefault(operation.label, set()).add(response.status_code)

        try:
            fuzz()
        except Exception as exc:  # one readable failure per operation
            pytest.fail(f"{operation.label}: {exc}")
    assert set(seen) == {op.label for op in operations}
    assert not any(code >= 500 for codes in seen.values() for code in codes), seen
    # the generated requests reached real data, not only 404s and 422s
    assert any(200 <= code < 300 for codes in seen.values() for code in codes), seen
