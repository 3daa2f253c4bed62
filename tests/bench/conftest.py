"""The tiny real DeRefNet export (single graph + streaming parts), shared with tests/service."""

from __future__ import annotations

import pytest

from tests.service.tiny_derefnet import tiny_model_path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)
