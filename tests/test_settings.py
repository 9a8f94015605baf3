"""Settings validation: bad values are rejected with a message that says what to change."""

from __future__ import annotations

import pytest

from coordinator import ConfigurationError, CoordinatorSettings, create_redis, redact_url


def test_defaults_are_valid() -> None:
    s = CoordinatorSettings()
    assert s.renew_interval_ms < s.renew_deadline_ms < s.lease_ttl_ms
    assert s.role == "all" and s.campaigns


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (
            {"renew_deadline_ms": 5000, "lease_ttl_ms": 5000},
            "renew_deadline_ms (5000) must be less",
        ),
        ({"renew_interval_ms": 4000}, "renew_interval_ms (4000) must be less than renew_deadline"),
        ({"retry_period_ms": 9000}, "retry_period_ms (9000) must be less than lease_ttl_ms"),
        ({"lease_ttl_ms": 0}, "lease_ttl_ms"),
        ({"lease_ttl_ms": -5}, "greater than 0"),
        ({"role": "boss"}, "role"),
        ({"namespace": "bad name!"}, "namespace 'bad name!' is not valid"),
        ({"relay_history": 0}, "relay_history"),
    ],
)
def test_bad_settings_rejected_with_clear_message(values: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CoordinatorSettings(**values)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("COORDINATOR_LEASE_TTL_MS", "9000")
    monkeypatch.setenv("COORDINATOR_ROLE", "api")
    s = CoordinatorSettings()
    assert s.redis_url == "redis://example:6380/2"
    assert s.lease_ttl_ms == 9000
    assert not s.campaigns
    monkeypatch.setenv("COORDINATOR_REDIS_URL", "redis://other:6379/0")
    assert CoordinatorSettings().redis_url == "redis://other:6379/0"
    # keyword arguments win over the environment
    assert CoordinatorSettings(redis_url="redis://kw:1/0").redis_url == "redis://kw:1/0"


def test_bad_environment_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_RENEW_INTERVAL_MS", "soon")
    with pytest.raises(ConfigurationError, match="renew_interval_ms"):
        CoordinatorSettings()


def test_settings_are_frozen() -> None:
    s = CoordinatorSettings()
    with pytest.raises(Exception, match="frozen"):
        s.lease_ttl_ms = 1  # type: ignore[misc]


def test_kubernetes_instance_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "web-7d9f-abcde")
    assert CoordinatorSettings().instance_id.startswith("web-7d9f-abcde-")


def test_redact_url_hides_password() -> None:
    assert redact_url("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://:s3cret@host/0") == "redis://:***@host/0"
    assert redact_url("redis://host:6379") == "redis://host:6379"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://host:6379", "scheme 'http'"),
        ("redis+sentinel://:pw@h1:26379", "must name the service"),
        ("redis+sentinel://h1:notaport/mymaster", "needs host:port"),
    ],
)
def test_bad_redis_urls(url: str, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle) as info:
        create_redis(url)
    assert "pw" not in str(info.value)
