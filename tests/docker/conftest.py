"""Fixtures of the deployment tests (helpers in tests/docker/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docker import support


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """The model the processes serve: models/derefnet.onnx when bundled, else the stand-in."""
    return support.model_path(tmp_path_factory)
