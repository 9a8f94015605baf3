"""Shared fixtures. Redis servers come from the coordinator.testing plugin
(``redis_url``: shared; ``redis_server``: owned by one test, killable)."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests on a shared Redis never collide."""
    return f"t{uuid.uuid4().hex[:10]}"
