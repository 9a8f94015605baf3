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
    return (f"{info['instance_id']} (pid {info['pid']} on {info['hostname']}), "
            f"term {info['fencing_token']}, ttl {info['ttl_ms'] / 1000:.1f}s, "
            f"since {info['acquired_at']}")  # fmt: skip


def status(answer: dict[str, Any]) -> str:
    lines = [f"namespace  {answer['namespace']} (election {answer['election']!r})",
             f"leader     {leader(answer['leader'])}"]  # fmt: skip
    instances = answer["instances"]
    alive = sum(1 for i in instances if i["alive"])
    lead = (answer["leader"] or {}).get("instance_id")
    lines.append(f"instances  {alive} alive, {len(instances) - alive} gone (last 10 min)")
    for i in instances:
        mark = "  leader" if i["instance_id"] == lead else ""
        lines.append(f"  {i['instance_id']:<36} {'alive' if i['alive'] else 'gone':<5} "
                     f"{i['role'] or '-':<6} seen {_ago(i['last_seen_ms'])}{mark}")  # fmt: skip
    channels = answer["channels"]
    more = " (first 1000)" if answer.get("channels_truncated") else ""
    lines.append(f"channels   {len(channels)}{more}")
    for c in channels:
        lines.append(f"  {c['channel']:<36} {c['history']:>7} events  last {c['last_event_id']}")
    return "\n".join(lines)


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

            seconds = (datetime.fromisoformat(r["finished_at"])
                       - datetime.fromisoformat(r["started_at"])).total_seconds()  # fmt: skip
            took = f" {seconds:.3f}s"
        error = f"  {r['error']}" if r.get("error") else ""
        lines.append(f"{r['scheduled_at']}  {r['job_id']:<24} {r['status']:<9} "
                     f"{r['instance_id']} token {r['fencing_token']}{took}{error}")  # fmt: skip
    return "\n".join(lines)
