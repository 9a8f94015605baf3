"""Shared fixtures. Redis servers come from the coordinator.testing plugin
(``redis_url``: shared; ``redis_server``: owned by one test, killable)."""

from __future__ import annotations

import uuid

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/chaos/conftest.py, so `./run test --chaos-rounds 5` works too.
    group = parser.getgroup("chaos")
    group.addoption("--chaos-rounds", type=int, default=1,
                    help="repeat each chaos fault N times (default 1)")  # fmt: skip
    group.addoption("--chaos-seed", type=int, default=None,
                    help="seed of the random fault mixes (default: random, printed)")  # fmt: skip


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests on a shared Redis never collide."""
    return f"t{uuid.uuid4().hex[:10]}"
