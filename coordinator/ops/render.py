"""Human-readable text for the ``coordinator`` command's answers (``--json`` skips it)."""

from __future__ import annotations

import time
from typing import Any


def _ago(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{max(0.0, time.time() - ms / 1000):.1f}s ago"


def leader(info: dict[str, Any] | None) -> str:
    if info is None:
        return "no leader"
    return (
        f"{info['instance_id']} (pid {info['pid']} on {info['hostname']}), "
        f"term {info['fencing_token']}, ttl {info['ttl_ms'] / 1000:.1f}s, "
        f"since {info['acquired_at']}"
    )


def status(answer: dict[str, Any]) -> str:
    lines = [
        f"redis      {redis_where(answer['redis'])}" if "redis" in answer else "",
        f"namespace  {answer['namespace']} (election {answer['election']!r})",
        f"leader     {leader(answer['leader'])}",
    ]
    instances = answer["instances"]
    alive = sum(1 for i in instances if i["alive"])
    lead = (answer["leader"] or {}).get("instance_id")
    lines.append(f"instances  {alive} alive, {len(instances) - alive} gone (last 10 min)")
    for i in instances:
        mark = "  leader" if i["instance_id"] == lead else ""
        lines.append(
            f"  {i['instance_id']:<36} {'alive' if i['alive'] else 'gone':<5} "
            f"{i['role'] or '-':<6} seen {_ago(i['last_seen_ms'])}{mark}"
        )
    channels = answer["channels"]
    more = " (first 1000)" if answer.get("channels_truncated") else ""
    lines.append(f"channels   {len(channels)}{more}")
    for c in channels:
        lines.append(f"  {c['channel']:<36} {c['history']:>7} events  last {c['last_event_id']}")
    return "\n".join(line for line in lines if line)


def event(item: dict[str, Any]) -> str:
    import json

    data = item["data"]
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"{item['id'] or '-'} {item['event']} {text}"


def runs(items: list[dict[str, Any]]) -> str:
    if not items:
        return "no runs recorded"
    lines = []
    for r in items:
        took = ""
        if r["started_at"] and r["finished_at"]:
            from datetime import datetime

            seconds = (
                datetime.fromisoformat(r["finished_at"]) - datetime.fromisoformat(r["started_at"])
            ).total_seconds()
            took = f" {seconds:.3f}s"
        error = f"  {r['error']}" if r.get("error") else ""
        lines.append(
            f"{r['scheduled_at']}  {r['job_id']:<24} {r['status']:<9} "
            f"{r['instance_id']} token {r['fencing_token']}{took}{error}"
        )
    return "\n".join(lines)


def redis_where(redis: dict[str, str]) -> str:
    """``<url> (from REDIS_URL)``, or ``(the default: REDIS_URL is not set)``."""
    source = redis["source"]
    if source == "default":
        return f"{redis['url']} (the default: REDIS_URL is not set)"
    return f"{redis['url']} (from {source})"


def redis_failure(redis: dict[str, str], exc: BaseException) -> str:
    """One line: which Redis failed, how, and which setting to check."""
    from redis.exceptions import AuthenticationError, ResponseError

    detail = str(exc) or type(exc).__name__
    check = (
        "check --redis-url"
        if redis["source"] == "--redis-url"
        else "check REDIS_URL / COORDINATOR_REDIS_URL, or pass --redis-url"
    )
    if isinstance(exc, AuthenticationError | ResponseError):
        what = "refused the command"
    else:
        what = "is unreachable"
    return f"Redis at {redis_where(redis)} {what} ({type(exc).__name__}: {detail}); {check}"
