import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty download cache of the test's own ($GANDISSECT_CACHE)."""
    c = tmp_path / "cache"
    monkeypatch.setenv("GANDISSECT_CACHE", str(c))
    return c
