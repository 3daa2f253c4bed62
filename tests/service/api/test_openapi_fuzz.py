"""Schemathesis against the service's own OpenAPI: no 5xx, every answer matches the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.runtime.config import Settings

# Examples and fuzzing (positive and negative data); the coverage phase is left out, it takes
# minutes on this schema (11x11 arrays of up to 64 frames) for little extra.
PHASES = {
    "examples": {"enabled": True},
    "fuzzing": {"enabled": True},
    "coverage": {"enabled": False},
    "stateful": {"enabled": False},
}
# The schema does not depend on the model, so it is built without loading one.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(model_path="unused.onnx")).openapi(),
    config=SchemathesisConfig.from_dict({"phases": PHASES}),
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server.base_url


@schema.parametrize()
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case, base_url):
    case.call_and_validate(base_url=base_url, checks=CHECKS)
