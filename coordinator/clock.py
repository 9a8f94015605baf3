"""Times as coordinator stores them: integer milliseconds since the Unix epoch, UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def ms_to_datetime(ms: float) -> datetime:
    """Epoch milliseconds as an aware UTC ``datetime``."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(value: datetime) -> int:
    """An aware ``datetime`` as epoch milliseconds (naive values are taken as local time)."""
    return round(value.timestamp() * 1000)


def ms_to_iso(ms: float | None) -> str | None:
    """Epoch milliseconds as ISO 8601 UTC text; ``None`` stays ``None``."""
    return None if ms is None else ms_to_datetime(ms).isoformat()
