"""Property-based: schemathesis generates requests from the served OpenAPI spec (valid and invalid
ones, for every operation); the server never answers 5xx and every error has the documented shape.

Generation requests are sent with ``Prefer: respond-async`` (so a fuzzed ``steps=50, n=8`` queues
a job instead of holding the test), and every job created is canceled afterwards.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 25}


def test_no_input_makes_the_server_fail(embedded):
    schema = schemathesis.openapi.from_url(f"{embedded.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/generate", "GET /v1/jobs/{job_id}", "DELETE /v1/jobs/{job_id}"} <= labels
    jobs: list[str] = []
    statuses: dict[str, set[int]] = {}

    def exercise(case):
        headers = {"Prefer": "respond-async"} if case.path == "/v1/generate" else {}
        response = case.call(base_url=embedded.url, headers=headers, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])
        statuses.setdefault(case.operation.label, set()).add(response.status_code)
        if case.path == "/v1/generate" and response.status_code == 202:
            jobs.append(response.json()["id"])
        if response.status_code >= 400 and response.status_code != 416:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str), response.text

    try:
        for operation in operations:
            if operation.path == "/metrics":
                continue
            for mode, examples in EXAMPLES.items():
                strategy = operation.as_strategy(generation_mode=mode)

                @given(case=strategy)
                @settings(max_examples=examples, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))  # fmt: skip
                def run(case):
                    exercise(case)

                try:
                    run()
                except Unsatisfiable:
                    assert mode == GenerationMode.NEGATIVE, operation.label  # nothing to make invalid
    finally:
        with embedded.client() as client:
            for job_id in jobs:
                client.delete(f"/v1/jobs/{job_id}")
    generate = statuses["POST /v1/generate"]
    assert 422 in generate and generate & {202, 429}, statuses  # both rejected and accepted inputs were tried
