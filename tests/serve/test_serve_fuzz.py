"""Fuzz the running service from its own OpenAPI schema (schemathesis): a bounded number of generated requests
per operation (derandomized, so a run is repeatable), no 5xx, the process alive afterwards. POST /api/images is
sent with the token, so that its bodies reach the image checks; DELETE without it (a fuzzed delete must not
remove the session index's images)."""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

EXAMPLES = 12     # per operation (9 operations); each request well under a second on the 256-px index


def _checker(op, name: str, headers: dict | None, seen: dict[str, set[int]]):
    @given(op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        r = case.call(timeout=60, headers=headers)
        seen.setdefault(name, set()).add(r.status_code)
        assert r.status_code < 500, f"{name} {case.formatted_path} -> {r.status_code}: {r.text[:500]}"

    return check


def test_no_server_errors(server, serve_token):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    seen: dict[str, set[int]] = {}
    for res in schema.get_all_operations():
        op = res.ok()
        name = f"{op.method.upper()} {op.path}"
        headers = {"Authorization": f"Bearer {serve_token}"} if name == "POST /api/images" else None
        _checker(op, name, headers, seen)()
    assert server.alive()
    assert {"POST /api/search", "GET /api/images/{image_id}", "GET /api/images/{image_id}/explain",
            "POST /api/images", "DELETE /api/images/{image_id}", "GET /api/stats", "GET /healthz",
            "GET /metrics"} <= set(seen)
    assert seen["DELETE /api/images/{image_id}"] == {401}
    assert seen["POST /api/search"] <= {200, 413, 415, 422}   # fuzzed bytes are refused with a reason
