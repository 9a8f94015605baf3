"""Runtime job triggers: JSON in, one normalized JSON form stored, the same trigger everywhere.

A runtime job's trigger arrives as JSON (``{"type": "interval", "seconds": 30}``)
from any process. :func:`normalize_trigger` checks it and fills in everything
that would otherwise depend on the process that reads it (the current time, the
local time zone), so :func:`build_trigger` gives the same APScheduler trigger on
every process, and every process computes the same fire times, which is what
lets each fire be claimed once.

- ``date``: ``run_date`` (ISO 8601; default: now). A ``run_date`` in the past by
  at most ``past_grace`` seconds runs at once; further in the past is refused
  (:class:`InvalidJobError` on ``trigger.run_date``), never silently dropped.
- ``interval``: ``weeks``, ``days``, ``hours``, ``minutes``, ``seconds`` (numbers,
  at least :data:`MIN_INTERVAL_S` in all), optional ``start_date`` (default: the
  time of the add plus one interval, stored, so the phase is fixed) and ``end_date``.
- ``cron``: APScheduler's fields (``year``, ``month``, ``day``, ``week``,
  ``day_of_week``, ``hour``, ``minute``, ``second``), optional ``start_date``,
  ``end_date`` and ``timezone`` (IANA name, default ``UTC``).

Times without an offset are read in the trigger's ``timezone`` (default UTC).
Stored times are ISO 8601 in UTC with milliseconds.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped]

from coordinator.errors import InvalidJobError

MIN_INTERVAL_S = 0.01
"""The shortest interval a runtime job may have."""
MAX_INTERVAL_S = 100_000_000
"""The longest (about three years): a fire plus one interval stays within the calendar."""
MAX_YEAR = 9990
"""The last year a trigger's dates may be in (fire times computed from them must fit)."""

TRIGGER_TYPES = ("date", "interval", "cron")
_INTERVAL_UNITS = ("weeks", "days", "hours", "minutes", "seconds")
_CRON_FIELDS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")
_MAX_TEXT = 200


def normalize_trigger(spec: object, now: datetime, past_grace: float) -> dict[str, Any]:
    """Check a trigger given as JSON; return its stored form (fixed times, UTC).

    Raises:
        InvalidJobError: naming the field (``trigger``, ``trigger.type``,
            ``trigger.run_date``, ``trigger.seconds``, ``trigger.timezone``...).
    """
    if not isinstance(spec, dict):
        raise InvalidJobError("trigger", "must be an object with a 'type'")
    kind = spec.get("type")
    if kind not in TRIGGER_TYPES:
        raise InvalidJobError("trigger.type", f"must be one of {', '.join(TRIGGER_TYPES)}")
    allowed = {
        "date": {"type", "run_date", "timezone"},
        "interval": {"type", "timezone", "start_date", "end_date", *_INTERVAL_UNITS},
        "cron": {"type", "timezone", "start_date", "end_date", *_CRON_FIELDS},
    }[kind]
    unknown = sorted(str(k) for k in spec if k not in allowed)
    if unknown:
        raise InvalidJobError(
            f"trigger.{unknown[0][:_MAX_TEXT]}",
            f"not a field of a {kind} trigger (fields: {', '.join(sorted(allowed))})",
        )
    tz = _timezone(spec.get("timezone", "UTC"))
    out: dict[str, Any] = {"type": kind}
    if "timezone" in spec:
        out["timezone"] = spec["timezone"]
    if kind == "date":
        run_date = _time(spec, "run_date", tz) if spec.get("run_date") is not None else now
        late = (now - run_date).total_seconds()
        if late > past_grace:
            raise InvalidJobError(
                "trigger.run_date",
                f"is {late:.3f}s in the past; a run_date up to {past_grace:g}s in the past "
                "runs at once, anything older is refused (omit run_date to run now)",
            )
        out["run_date"] = _iso(run_date)
    elif kind == "interval":
        seconds = 0.0
        for unit in _INTERVAL_UNITS:
            if unit in spec:
                value = spec[unit]
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                    or value < 0
                    or value > 1e8
                ):
                    raise InvalidJobError(
                        f"trigger.{unit}", "must be a number between 0 and 100000000"
                    )
                out[unit] = value
                seconds += timedelta(**{unit: value}).total_seconds()
        if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:
            raise InvalidJobError(
                "trigger.seconds",
                f"the interval (weeks, days, hours, minutes, seconds together) must be from "
                f"{MIN_INTERVAL_S}s to {MAX_INTERVAL_S}s",
            )
        start = (
            _time(spec, "start_date", tz)
            if spec.get("start_date") is not None
            else now + timedelta(seconds=seconds)
        )
        out["start_date"] = _iso(start)
        if spec.get("end_date") is not None:
            out["end_date"] = _iso(_time(spec, "end_date", tz))
    else:
        fields = {f: spec[f] for f in _CRON_FIELDS if f in spec}
        for name, value in fields.items():
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise InvalidJobError(f"trigger.{name}", "must be a string or an integer")
            if isinstance(value, str) and len(value) > _MAX_TEXT:
                raise InvalidJobError(f"trigger.{name}", f"longer than {_MAX_TEXT} characters")
            try:
                CronTrigger(**{name: value}, timezone=tz)
            except (ValueError, TypeError) as exc:
                raise InvalidJobError(f"trigger.{name}", str(exc)[:_MAX_TEXT]) from None
        if not fields:
            raise InvalidJobError(
                "trigger", f"a cron trigger needs at least one of {', '.join(_CRON_FIELDS)}"
            )
        out.update(fields)
        for name in ("start_date", "end_date"):
            if spec.get(name) is not None:
                out[name] = _iso(_time(spec, name, tz))
    # Build it once here, so every problem APScheduler finds is reported now, by field.
    trigger = build_trigger(out)
    if kind == "cron" and trigger.get_next_fire_time(None, now) is None:
        raise InvalidJobError("trigger", "this cron trigger never fires after now")
    return out


def build_trigger(stored: dict[str, Any]) -> Any:
    """The APScheduler trigger of a stored (normalized) trigger; the same on every process.

    Raises:
        InvalidJobError: the trigger's fields are rejected by APScheduler.
    """
    kind = stored["type"]
    tz = _timezone(stored.get("timezone", "UTC"))
    try:
        if kind == "date":
            return DateTrigger(run_date=_parse(stored["run_date"], tz), timezone=tz)
        if kind == "interval":
            units = {u: stored[u] for u in _INTERVAL_UNITS if u in stored}
            return IntervalTrigger(
                **units,
                start_date=_parse(stored["start_date"], tz),
                end_date=_parse(stored["end_date"], tz) if "end_date" in stored else None,
                timezone=tz,
            )
        fields = {f: stored[f] for f in _CRON_FIELDS if f in stored}
        return CronTrigger(
            **fields,
            start_date=_parse(stored["start_date"], tz) if "start_date" in stored else None,
            end_date=_parse(stored["end_date"], tz) if "end_date" in stored else None,
            timezone=tz,
        )
    except (ValueError, TypeError, OverflowError) as exc:
        field = next(
            (f"trigger.{f}" for f in (*_CRON_FIELDS, *_INTERVAL_UNITS) if f"'{f}'" in str(exc)),
            "trigger",
        )
        raise InvalidJobError(field, str(exc)[:_MAX_TEXT]) from None


def is_final(stored: dict[str, Any]) -> bool:
    """A trigger that fires once: its fire is the job's last (a date trigger)."""
    return bool(stored.get("type") == "date")


def _timezone(name: object) -> tzinfo:
    if not isinstance(name, str) or not name or len(name) > 64:
        raise InvalidJobError("trigger.timezone", "must be an IANA time zone name, such as UTC")
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidJobError(
            "trigger.timezone", f"{name[:64]!r} is not an IANA time zone (e.g. Europe/Paris)"
        ) from None


def _time(spec: dict[str, Any], name: str, tz: tzinfo) -> datetime:
    value = spec[name]
    if not isinstance(value, str):
        raise InvalidJobError(f"trigger.{name}", "must be an ISO 8601 date and time string")
    try:
        return _parse(value, tz)
    except ValueError:
        raise InvalidJobError(
            f"trigger.{name}",
            f"{value[:64]!r} is not an ISO 8601 date and time from 1970 to {MAX_YEAR} "
            "(e.g. 2026-11-23T18:00:00Z)",
        ) from None


def _parse(value: str, tz: tzinfo) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    try:
        year = parsed.astimezone(UTC).year
    except OverflowError:  # an offset that moves it out of the calendar
        year = 0
    if not 1970 <= year <= MAX_YEAR:
        raise ValueError(f"the year must be from 1970 to {MAX_YEAR}")
    return parsed


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="milliseconds")
