"""Schemathesis over the server's own OpenAPI schema: generated requests, valid and not, never get a
server error, invalid ones are refused, and responses match the documented schemas, status codes and
content types. (Schema-valid requests may still be refused: a prompt too long for the context, or an
OpenAI option this server does not implement, so "positive data acceptance" is not checked.)"""

from __future__ import annotations

import pytest

from live import serving

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402


@pytest.fixture(scope="module")
def fuzzed_server(tiny_lm):
    # a short context and few sequences keep every generated request cheap
    with serving(tiny_lm, max_model_len=32, max_num_seqs=8, max_waiting=8) as live:
        yield live


@pytest.fixture
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_generated_requests_get_no_server_error(case):
    case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
