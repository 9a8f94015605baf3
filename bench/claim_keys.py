"""Redis keys and memory left by 10,000 fires of one job: a key per fire against a field per job.

    python -m bench claim_keys [--fires 10000] [--interval 0.002]

Both designs run in one go, on one redis-server the benchmark starts, one after
the other (``FLUSHALL`` between them), and are driven the way users drive them:
a :class:`~coordinator.LeaderScheduler` that leads alone runs one interval job
(every ``--interval`` seconds, a no-op) until ``--fires`` fires were claimed. A
fire the scheduler could not keep up with is claimed too (recorded ``missed``),
so "fires" counts claims, the unit the designs differ in.

- ``per-fire key``: the claim script before this change (commit b6b2d82,
  ``coordinator/lua/claim_fire.lua``, embedded below): ``SET NX PX 7 days`` on
  ``fire:<job>:<scheduled ms>`` with the claimer as value, plus the last-fire
  hash. It replaces the library's ``CLAIM_FIRE`` for that run, behind the
  current call shape (the extra key and arguments are added on the way).
- ``field per job``: the library as it is (the last-fire hash only).

Measured after the scheduler stopped: ``DBSIZE`` and ``INFO memory``
``used_memory``, minus ``used_memory`` of the empty server before the run. The
run history (capped at ``COORDINATOR_JOB_HISTORY``, 1000 records) is in both.
Prints a markdown table, writes ``bench/results/claim_keys.json`` and
``bench/claim_keys.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

import coordinator.scheduler.firing as firing
from coordinator import CoordinatorSettings, Keys, LeaderScheduler, create_redis
from coordinator.store.scripts import ArgT, KeyT, LuaScript
from coordinator.testing import RedisServer, async_wait_until
from tests.support.timing import FAST

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WEEK_MS = 7 * 86_400_000

# The claim as of commit b6b2d82 (coordinator/lua/lease_lib.lua + claim_fire.lua).
PER_FIRE_KEY_SOURCE = """\
local function lease_is_current(lease_key, value)
  return redis.call('GET', lease_key) == value
end
-- KEYS[1] lease, KEYS[2] fire claim (job id + scheduled time), KEYS[3] last-fire hash,
-- KEYS[4] run history list
-- ARGV[1] caller's lease value, ARGV[2] job id, ARGV[3] scheduled ms, ARGV[4] claim ttl ms,
-- ARGV[5] claim value (JSON), ARGV[6] "run" or "missed", ARGV[7] history record (JSON,
-- pushed only for "missed"), ARGV[8] history cap
if not lease_is_current(KEYS[1], ARGV[1]) then
  return {0}
end
local last = redis.call('HGET', KEYS[3], ARGV[2])
if last and tonumber(last) >= tonumber(ARGV[3]) then
  return {-1, last}
end
if not redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[4]) then
  return {-1, last or false}
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
if ARGV[6] == 'missed' then
  redis.call('LPUSH', KEYS[4], ARGV[7])
  redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[8]) - 1)
end
return {1}
"""


def _script(name: str, source: str) -> LuaScript:
    script = LuaScript.__new__(LuaScript)
    script.name, script.source = name, source
    script.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
    return script


class PerFireKeyClaim:
    """The old claim behind the current call shape: adds the per-fire key, its TTL and
    the claim value (who claimed, as the old code wrote it)."""

    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._script = _script("claim_fire_per_key", PER_FIRE_KEY_SOURCE)

    async def __call__(self, redis: Redis, keys: Sequence[KeyT], args: Sequence[ArgT]) -> Any:
        lease, last_fire, runs = keys
        lease_value, job_id, scheduled_ms, mode, record, cap = args
        lease_info = json.loads(lease_value)
        claim = json.dumps(
            {
                "instance_id": lease_info["instance_id"],
                "fencing_token": int(lease_info["fencing_token"]),
                "claimed_ms": int(time.time() * 1000),
            }
        )
        fire_key = f"{self._keys.prefix}fire:{job_id}:{scheduled_ms}"
        return await self._script(
            redis,
            [lease, fire_key, last_fire, runs],
            [lease_value, job_id, scheduled_ms, WEEK_MS, claim, mode, record, cap],
        )


@contextlib.contextmanager
def claim_script(replacement: Any) -> Iterator[None]:
    original = firing.CLAIM_FIRE
    if replacement is not None:
        firing.CLAIM_FIRE = replacement
    try:
        yield
    finally:
        firing.CLAIM_FIRE = original


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def run_design(url: str, design: str, fires: int, interval: float) -> dict[str, Any]:
    admin = create_redis(url)
    await admin.flushall()
    empty = await used_memory(admin)
    namespace = f"bench{uuid.uuid4().hex[:8]}"
    keys = Keys(namespace)
    redis = create_redis(url)
    settings = CoordinatorSettings(namespace=namespace, instance_id="bench", **FAST)
    scheduler = LeaderScheduler(redis, settings)
    scheduler.add_job(lambda: None, "interval", id="tick", seconds=interval)
    replacement = PerFireKeyClaim(keys) if design == "per-fire key" else None
    with claim_script(replacement):
        started = time.monotonic()
        await scheduler.start()
        await async_wait_until(
            lambda: scheduler.stats.claimed >= fires,
            timeout=fires * interval * 20 + 60,
            interval=0.05,
            message=f"{fires} fires claimed",
        )
        elapsed = time.monotonic() - started
        await scheduler.stop()
    await redis.aclose()
    fire_keys = 0
    async for _ in admin.scan_iter(match=f"{keys.prefix}fire:*", count=1000):
        fire_keys += 1
    result = {
        "design": design,
        "fires": scheduler.stats.claimed,
        "runs": scheduler.stats.ok,
        "missed": scheduler.stats.missed,
        "seconds": elapsed,
        "dbsize": int(await admin.dbsize()),
        "fire_keys": fire_keys,
        "used_memory": await used_memory(admin),
        "used_memory_delta": await used_memory(admin) - empty,
    }
    await admin.aclose()
    return result


def table(results: list[dict[str, Any]]) -> str:
    old, new = results
    lines = [
        "| design | fires claimed (run / missed) | DBSIZE | per-fire keys "
        "| used_memory | over the empty server | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['design']} | {r['fires']:,} ({r['runs']:,} / {r['missed']:,}) "
            f"| {r['dbsize']:,} | {r['fire_keys']:,} | {r['used_memory'] / 2**20:.2f} MiB "
            f"| {r['used_memory_delta'] / 2**20:.2f} MiB | {r['seconds']:.1f} s |"
        )
    key_ratio = old["dbsize"] / max(1, new["dbsize"])
    mem_ratio = old["used_memory_delta"] / max(1, new["used_memory_delta"])
    per_fire = (old["used_memory_delta"] - new["used_memory_delta"]) / max(1, old["fires"])
    lines.append(
        f"| ratio per-fire key / field per job | | {key_ratio:,.0f}x | | "
        f"{old['used_memory'] / new['used_memory']:.2f}x | {mem_ratio:.1f}x | |"
    )
    lines.append("")
    lines.append(
        f"A per-fire key costs about {per_fire:.0f} bytes of Redis memory; a job firing "
        f"every second keeps 604,800 of them for their 7-day TTL, about "
        f"{per_fire * 604_800 / 2**20:.0f} MiB (extrapolated, not measured)."
    )
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["design"] for r in results]
    panels = [
        ("dbsize", "keys in Redis (DBSIZE, log)", 1, True),
        ("used_memory_delta", "Redis memory over the empty server (MiB)", 2**20, False),
    ]
    for ax, (key, title, unit, log) in zip(axes, panels, strict=True):
        values = [r[key] / unit for r in results]
        bars = ax.bar(names, values, color=["#c0504d", "#4f81bd"])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if unit == 1 else f"{v:.2f}" for v in values])
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
    fires = results[0]["fires"]
    fig.suptitle(f"Fire claims: Redis footprint after {fires:,} fires of one job")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench claim_keys")
    parser.add_argument("--fires", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=0.002, help="job interval, seconds")
    args = parser.parse_args(argv)
    # Thousands of "missed" warnings otherwise (a 2 ms job outruns its own runs).
    for name in ("coordinator", "apscheduler"):
        logging.getLogger(name).setLevel(logging.ERROR)

    async def both(url: str) -> list[dict[str, Any]]:
        return [
            await run_design(url, design, args.fires, args.interval)
            for design in ("per-fire key", "field per job")
        ]

    with RedisServer() as server:
        results = asyncio.run(both(server.url))
    print(f"\nFire claims: {args.fires:,} fires of one job every {args.interval * 1000:g} ms\n")
    print(table(results))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "claim_keys.json").write_text(json.dumps(results, indent=2))
    chart(results, HERE / "claim_keys.png")
    print("\nwrote bench/results/claim_keys.json and bench/claim_keys.png")
    old, new = results
    return 0 if new["fire_keys"] == 0 and old["fire_keys"] >= min(args.fires, old["fires"]) else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
