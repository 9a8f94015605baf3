"""Bad input and abuse against a real ``uvicorn app.main:app`` on a real Redis.

- A seeded generator over the demo's ``/openapi.json`` (every operation, hostile path
  parameters, query strings and bodies): no 5xx, no traceback in any response.
  (Schemathesis was not used: its dependency tree is large for an offline CI; this
  generator is small and reads the same schema.)
- The runtime job routes (``/api/jobs[/{id}]``, pause, resume, run) get job-shaped
  bodies too: valid specs with hostile triggers (dates at the edges of the calendar,
  huge intervals, bad time zones and cron fields), arguments the task does not take,
  and ids that exist (a code-declared job, a runtime job, ``runs``).
- Oversized and deeply nested payloads get a clear 413/422; many channels and many
  connections from one client leave the worker's memory bounded and get a clear 429
  when the per-client limit is set.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..support.app_cluster import HOST, AppCluster

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]

NASTY = [
    "",
    " ",
    "a" * 129,
    "a" * 5000,
    "../etc/passwd",
    "%00",
    "%2e%2e",
    "ch an",
    "é",
    "🙂",
    "-leading",
    "a/b",
    "a%2Fb",
    "null",
    "0",
    "-1",
    "1e309",
    "[]",
    "{}",
    "reset",
    "x" * 128,
    "ok",
    "ok.ch:1-x",
]
JOB_IDS = ["collect-metrics", "abuse-job", "runs", "abuse-date"]
QUERY = ["", "-1", "0", "1", "999999999999999999999", "abc", "1-2-3", "0-0", "%ff", "a" * 3000]


def deep(n: int) -> Any:
    value: Any = 1
    for _ in range(n):
        value = [value]
    return value


def bodies(rng: random.Random) -> list[bytes | None]:
    return [
        None,
        b"",
        b"not json",
        b"{",
        b"[]",
        b"null",
        b'"x"',
        b"1e999",
        json.dumps({"data": 1}).encode(),
        json.dumps({"event": "reset", "data": 1}).encode(),
        json.dumps({"event": "a" * 100, "data": 1}).encode(),
        json.dumps({"data": 1, "extra": 2}).encode(),
        json.dumps({"data": "x" * 70_000}).encode(),  # over the 64 KiB default
        b'{"data": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",  # deeper than any parser likes
        json.dumps({"data": deep(500)}).encode(),
        json.dumps({"data": {str(i): i for i in range(rng.randint(1, 5000))}}).encode(),
        bytes(rng.randrange(256) for _ in range(64)),
        b'{"data": NaN}',
        b'{"data": "\\ud800"}',
    ]


TRIGGERS: list[Any] = [
    None,
    1,
    "date",
    [],
    {},
    {"type": "nope"},
    {"type": "date"},
    {"type": "date", "run_date": None},
    {"type": "date", "run_date": 1},
    {"type": "date", "run_date": "tomorrow"},
    {"type": "date", "run_date": "0001-01-01T00:00:00+14:00"},
    {"type": "date", "run_date": "0001-01-01T00:00:00"},
    {"type": "date", "run_date": "9999-12-31T23:59:59-14:00"},
    {"type": "date", "run_date": "9998-12-31T23:59:59Z"},
    {"type": "date", "run_date": "2000-01-01T00:00:00Z"},
    {"type": "date", "run_date": "2099-01-01T00:00:00", "timezone": "Mars/Olympus"},
    {"type": "date", "run_date": "2099-01-01T00:00:00", "timezone": "../../etc/passwd"},
    {"type": "date", "run_date": "2099-01-01T00:00:00", "timezone": ""},
    {"type": "date", "extra": 1},
    {"type": "interval"},
    {"type": "interval", "seconds": 0},
    {"type": "interval", "seconds": -1},
    {"type": "interval", "seconds": 1e308},
    {"type": "interval", "seconds": "5"},
    {"type": "interval", "seconds": True},
    {"type": "interval", "weeks": 1e8},
    {"type": "interval", "days": 1e8, "seconds": 1e8},
    {"type": "interval", "seconds": 3600, "start_date": "9998-12-31T23:59:59Z"},
    {"type": "interval", "weeks": 100, "start_date": "9998-06-01T00:00:00Z"},
    {"type": "interval", "seconds": 60, "end_date": "2000-01-01T00:00:00Z"},
    {"type": "interval", "seconds": 60, "start_date": "0001-01-01T00:00:00+14:00"},
    {"type": "cron"},
    {"type": "cron", "second": "*/0"},
    {"type": "cron", "second": "61"},
    {"type": "cron", "day_of_week": "xyz"},
    {"type": "cron", "year": 1999},
    {"type": "cron", "year": "9999"},
    {"type": "cron", "month": "2", "day": "31"},
    {"type": "cron", "second": [1]},
    {"type": "cron", "hour": "*" * 300},
    {"type": "cron", "minute": "*", "end_date": "2000-01-01T00:00:00Z"},
    {"type": "cron", "minute": "*", "timezone": "Europe/Paris"},
]


def job_bodies(rng: random.Random) -> list[bytes]:
    """Job-shaped bodies for ``POST /api/jobs``: mostly valid fields around a hostile part."""
    out = []
    for trigger in TRIGGERS:
        valid = {"task": "remind", "trigger": trigger, "kwargs": {"message": "m"}}
        out.append(json.dumps(valid).encode())
        spec: dict[str, Any] = {
            "id": rng.choice([*JOB_IDS, *NASTY, None]),
            "task": rng.choice(["remind", "remind", "nope", "", "a" * 200, 1]),
            "trigger": trigger,
        }
        if rng.random() < 0.5:
            spec["kwargs"] = rng.choice(
                [{"message": "hi"}, {"ctx": 1}, {"nope": 1}, {"message": "x" * 20_000}, []]
            )
        if rng.random() < 0.3:
            spec["args"] = rng.choice([[1, 2, 3], [deep(200)], "x", [None]])
        if rng.random() < 0.3:
            spec["misfire_grace_time"] = rng.choice([0, 1, -5, 10**20, 1.5, "x", 604800])
        if rng.random() < 0.2:
            spec["replace"] = rng.choice([True, "yes"])
        out.append(json.dumps(spec).encode())
    ok = {"task": "remind", "trigger": {"type": "interval", "seconds": 3600}}
    out.append(json.dumps({**ok, "id": "abuse-job", "replace": True}).encode())
    return out


@pytest.fixture
async def app(redis_url: str, namespace: str) -> AsyncIterator[AppCluster]:
    cluster = AppCluster(
        redis_url,
        namespace,
        workers=1,
        app="app.main:app",
        env={"COORDINATOR_SSE_MAX_CONNECTIONS_PER_CLIENT": "20"},
    )
    async with cluster.running(exit_codes=(0, -15)):
        yield cluster


def check(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:300])
    assert "Traceback" not in response.text and 'File "' not in response.text, what


async def test_openapi_operations_never_500(app: AppCluster, chaos_seed: int) -> None:
    rng = random.Random(chaos_seed)
    async with httpx.AsyncClient(base_url=app.base, timeout=10) as http:
        schema = (await http.get("/openapi.json")).json()
        operations = [
            (path, method, op)
            for path, item in schema["paths"].items()
            for method, op in item.items()
        ]
        assert len(operations) >= 8, [o[:2] for o in operations]
        job_ops = {(p, m) for p, m, _ in operations if p.startswith("/api/jobs")}
        assert {
            ("/api/jobs", "get"),
            ("/api/jobs", "post"),
            ("/api/jobs/{job_id}", "get"),
            ("/api/jobs/{job_id}", "delete"),
            ("/api/jobs/{job_id}/pause", "post"),
            ("/api/jobs/{job_id}/resume", "post"),
            ("/api/jobs/{job_id}/run", "post"),
        } <= job_ops, job_ops
        date_job = {"id": "abuse-date", "task": "remind", "trigger": {"type": "date"}}
        assert (await http.post("/api/jobs", json=date_job)).status_code == 201
        sent = 0
        failures: list[str] = []  # every 5xx, reported together
        for path, method, op in operations:
            params = [p for p in op.get("parameters", []) if p["in"] == "query"]
            jobs = path.startswith("/api/jobs")
            payloads = bodies(rng) + (job_bodies(rng) if jobs and method == "post" else [])
            for body in payloads:
                names = NASTY + JOB_IDS * 6 if jobs else NASTY
                url = re.sub(
                    r"\{[^}]+\}",
                    lambda _, names=names: rng.choice(names).replace("/", "%2F") or "x",
                    path,
                )
                query = {p["name"]: rng.choice(QUERY) for p in params if rng.random() < 0.8}
                streaming = "text/event-stream" in json.dumps(op.get("responses", {}))
                request = http.build_request(
                    method.upper(),
                    url,
                    params=query,
                    content=body,
                    headers={"content-type": "application/json"},
                )
                if streaming or (path.endswith("/events") and method == "get"):
                    response = await http.send(request, stream=True)
                    await response.aclose()
                    assert response.status_code < 500, (method, url, response.status_code)
                else:
                    response = await http.send(request)
                    try:
                        check(response, f"{method} {url} {body!r:.80}")
                    except AssertionError as exc:
                        failures.append(str(exc))
                sent += 1
        assert not failures, "\n".join(failures[:40])
        listed = await http.get("/api/jobs")
        check(listed, "GET /api/jobs after the run")
        assert listed.status_code == 200 and isinstance(listed.json(), list)
    print(f"{sent} generated requests over {len(operations)} operations, no 5xx")


async def test_oversized_and_nested_payloads_get_clear_4xx(app: AppCluster) -> None:
    async with httpx.AsyncClient(base_url=app.base, timeout=20) as http:
        big = await http.post("/api/channels/c/events", json={"data": "x" * 70_000})
        assert big.status_code == 413 and "bytes" in big.text, big.text
        huge = await http.post(
            "/api/channels/c/events",
            content=b'{"data":"' + b"x" * 8_000_000 + b'"}',
            headers={"content-type": "application/json"},
        )
        assert huge.status_code == 413, huge.text[:200]
        nested = await http.post(
            "/api/channels/c/events",
            content=b'{"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            headers={"content-type": "application/json"},
        )
        assert nested.status_code in (413, 422), nested.text[:200]
        for r in (big, huge, nested):
            check(r, "payload")
            assert r.json()["detail"], r.text


async def test_many_channels_and_connections_from_one_client(app: AppCluster) -> None:
    async with httpx.AsyncClient(base_url=app.base, timeout=20) as http:
        rss_before = await worker_rss(app)
        for batch in range(10):
            responses = await asyncio.gather(
                *(
                    http.post(f"/api/channels/many-{batch}-{i}/events", json={"data": i})
                    for i in range(50)
                )
            )
            assert {r.status_code for r in responses} == {202}
        rss_after = await worker_rss(app)
        assert rss_after - rss_before < 50 * 2**20, (rss_before, rss_after)

    # 40 streams from one address with a limit of 20 per client: 20 x 200, then 429s.
    readers, statuses = [], []
    try:
        for _ in range(40):
            reader, writer = await asyncio.open_connection(HOST, app.port)
            writer.write(b"GET /api/channels/conn/events HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            statuses.append(int(head.split()[1]))
            readers.append(writer)
    finally:
        for writer in readers:
            writer.close()
    assert statuses.count(200) == 20 and statuses.count(429) == 20, statuses


async def worker_rss(app: AppCluster) -> int:
    """Resident memory of the (single) worker, from /proc via its pid."""
    async with httpx.AsyncClient(base_url=app.base, timeout=5) as http:
        pid = (await http.get("/api/instance")).json()["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():  # noqa: ASYNC240
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
