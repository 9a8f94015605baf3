"""Settings validation: bad values are rejected with a message that says what to change."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


SUGGESTION = re.compile(r"(COORDINATOR_[A-Z_]+) \(e\.g\. (\d+)\)")


def apply_suggestions(message: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with every ``COORDINATOR_X (e.g. N)`` of ``message`` applied."""
    return {**env, **dict(SUGGESTION.findall(message))}


def test_every_timing_problem_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_LEASE_TTL_MS", "100")
    with pytest.raises(ConfigurationError) as info:
        CoordinatorSettings()
    message = str(info.value)
    assert "3 problems" in message
    for variable in (
        "COORDINATOR_RENEW_DEADLINE_MS",
        "COORDINATOR_RENEW_INTERVAL_MS",  # 1000 >= any deadline below 100: said now
        "COORDINATOR_RETRY_PERIOD_MS",
    ):
        assert f"{variable} (e.g." in message, message
    # One try: doing what the message says gives valid settings.
    for name, value in apply_suggestions(message, {}).items():
        monkeypatch.setenv(name, value)
    fixed = CoordinatorSettings()
    assert fixed.lease_ttl_ms == 100
    assert fixed.renew_interval_ms < fixed.renew_deadline_ms < fixed.lease_ttl_ms
    assert fixed.retry_period_ms < fixed.lease_ttl_ms


def test_field_and_timing_problems_come_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_LEASE_TTL_MS", "100")
    monkeypatch.setenv("COORDINATOR_ROLE", "boss")
    monkeypatch.setenv("COORDINATOR_NAMESPACE", "bad name!")
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret@host:6379/abc")
    with pytest.raises(ConfigurationError) as info:
        CoordinatorSettings()
    message = str(info.value)
    assert "6 problems" in message, message
    assert "role (COORDINATOR_ROLE)" in message and "'boss'" in message
    assert "namespace (COORDINATOR_NAMESPACE)" in message
    assert "REDIS_URL / COORDINATOR_REDIS_URL" in message and "'abc' is not a number" in message
    assert "COORDINATOR_RENEW_DEADLINE_MS (e.g." in message
    assert "s3cret" not in message


def test_an_invalid_timing_value_does_not_invent_other_problems(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COORDINATOR_LEASE_TTL_MS", "soon")
    monkeypatch.setenv("COORDINATOR_RENEW_DEADLINE_MS", "9000")  # fine once the TTL is given
    with pytest.raises(ConfigurationError) as info:
        CoordinatorSettings()
    message = str(info.value)
    assert "lease_ttl_ms (COORDINATOR_LEASE_TTL_MS)" in message and "'soon'" in message
    assert "RENEW_DEADLINE" not in message and "problems" not in message


@settings(max_examples=300, deadline=None)
@given(
    ttl=st.integers(1, 20_000),
    deadline=st.integers(1, 20_000),
    interval=st.integers(1, 20_000),
    retry=st.integers(1, 20_000),
)
def test_suggested_timings_always_fit(ttl: int, deadline: int, interval: int, retry: int) -> None:
    values = {
        "COORDINATOR_LEASE_TTL_MS": str(ttl),
        "COORDINATOR_RENEW_DEADLINE_MS": str(deadline),
        "COORDINATOR_RENEW_INTERVAL_MS": str(interval),
        "COORDINATOR_RETRY_PERIOD_MS": str(retry),
    }

    def build(env: dict[str, str]) -> CoordinatorSettings:
        return CoordinatorSettings(
            **{name.removeprefix("COORDINATOR_").lower(): int(v) for name, v in env.items()}
        )

    try:
        build(values)
    except ConfigurationError as exc:
        build(apply_suggestions(str(exc), values))  # one fix, never a second error


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis://:s3cret@host:6379/abc", "database 'abc' is not a number"),
        ("rediss://host:6380/1x", "database '1x' is not a number"),
        ("redis://host:6379/0/1", "database '0/1' is not a number"),
        ("redis://host:6379/?db=two", "database 'two' is not a number"),
        ("redis://host:port/0", "port 'port' is not a number"),
        ("unix:///run/redis.sock?db=abc", "db='abc' is not a number; use unix:///"),
        ("redis+sentinel://:s3cret@h1:26379,h2:26379/mymaster/abc", "'abc' is not a number"),
        ("redis+sentinel://h1:26379/mymaster/0/1", "'0/1' is not a number"),
        ("redis+sentinel://h1:26379", "must name the service"),
        ("http://host:6379/0", "scheme 'http'"),
    ],
)
def test_bad_redis_url_rejected_by_settings(
    monkeypatch: pytest.MonkeyPatch, url: str, needle: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ConfigurationError) as info:
        CoordinatorSettings()
    message = str(info.value)
    assert needle in message and "REDIS_URL / COORDINATOR_REDIS_URL" in message
    assert "s3cret" not in message
    with pytest.raises(ConfigurationError, match=re.escape(needle)):
        create_redis(url)  # the connection factory applies the same rules


@pytest.mark.parametrize(
    "url",
    [
        "redis://host",
        "redis://host:6379/",
        "redis://user:pw@host:6379/15",
        "rediss://host:6380/1?ssl_cert_reqs=none",
        "unix:///run/redis.sock",
        "unix:///run/redis.sock?db=3",
        "redis+sentinel://:pw@h1:26379,h2:26379/mymaster",
        "redis+sentinel://h1:26379/mymaster/2",
    ],
)
def test_good_redis_urls_accepted(url: str) -> None:
    assert CoordinatorSettings(redis_url=url).redis_url == url
