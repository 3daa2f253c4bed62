"""Fixtures of the deployment tests (helpers in tests/docker/support.py), and the gate of the
real-engine tests (marker ``docker``): they run only when asked for, with ``make test-docker``
(``pytest -m docker``) or CSIST_DOCKER_TESTS=1, because they build images and start
containers for minutes; elsewhere they are skipped with that reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.docker import support

# Lines the real-engine tests want in the run's summary (image sizes, build times).
REPORT: list[str] = []


def docker_tests_requested(config) -> bool:
    if os.environ.get("CSIST_DOCKER_TESTS", "") not in ("", "0"):
        return True
    expr = config.getoption("markexpr", "") or ""
    return "docker" in expr and "not docker" not in expr


def pytest_collection_modifyitems(config, items):
    if docker_tests_requested(config):
        return
    skip = pytest.mark.skip(
        reason="real Docker engine test: run it with `make test-docker` (pytest -m docker) or CSIST_DOCKER_TESTS=1"
    )
    for item in items:
        if item.get_closest_marker("docker") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if REPORT:
        terminalreporter.section("docker images")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The model the processes serve: models/derefnet when bundled, else the stand-in."""
    return support.model_path(tmp_path_factory)
