"""Schemathesis over the real app served by uvicorn, with tokens configured: every operation, positive
and negative data; no 5xx, and every answer is one the OpenAPI document describes (status, media type,
headers, body schema). Bounded: a few dozen cases per operation and a tiny max_new_tokens cap. Under CI,
hypothesis derandomizes (its built-in "ci" profile), so a CI run is reproducible; locally each run explores anew."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from server.api.app import create_app
from server.config import Settings

pytestmark = pytest.mark.slow  # fuzzing: schemathesis over a live server

API_TOKEN, ADMIN_TOKEN = "fuzz-api-token", "fuzz-admin-token"
# Cases per operation with a token: 40 in CI; FUZZ_EXAMPLES=500 for a deeper run by hand.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, unsupported_method, allow_header_conformance]


SETTINGS = {"api_token": API_TOKEN, "admin_token": ADMIN_TOKEN, "max_new_tokens_cap": 2, "max_context": 256,
            "max_batch_requests": 4}
# The document as the app serves it; building the app loads no model (that happens at startup).
# (Loaded here rather than from the live server's URL: schemathesis' lazy fixture loader needs a pytest < 9.)
schema = schemathesis.openapi.from_dict(create_app(Settings(**SETTINGS)).openapi())


@pytest.fixture(scope="module")
def fuzzed_server(start_server, llama_dir):
    server = start_server(model=str(llama_dir), **SETTINGS)
    yield server
    server.stop()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, fuzzed_server):
    case.call_and_validate(base_url=fuzzed_server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                           checks=CHECKS)


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_without_a_token_every_protected_operation_is_a_documented_401(case, fuzzed_server):
    case.call_and_validate(base_url=fuzzed_server.url, checks=CHECKS)
