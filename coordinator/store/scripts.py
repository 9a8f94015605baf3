"""Every Lua script coordinator runs, loaded once from ``coordinator/store/lua/``.

A script may start with ``--! include: NAME`` lines; the named files of ``lua/``
are prepended, so shared checks (``lease_lib``) are written once.

Scripts run with ``EVALSHA``; when the server does not know the script (a
restart, ``SCRIPT FLUSH``, a failover) it is sent once with ``EVAL`` and cached
again by the server.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from coordinator.store.connection import RedisClient

_INCLUDE = re.compile(r"^--! include: ([a-z_]+)\s*$", re.MULTILINE)

KeyT = str | bytes
ArgT = str | bytes | int | float


def _read(name: str) -> str:
    return resources.files("coordinator.store").joinpath("lua", f"{name}.lua").read_text("utf-8")


class LuaScript:
    """One Lua script: its source (with includes resolved) and SHA1."""

    def __init__(self, name: str, includes: Sequence[str] = ()) -> None:
        body = _read(name)
        names = list(includes) + [n for n in _INCLUDE.findall(body) if n not in includes]
        self.name = name
        self.source = "\n".join([*(_read(n) for n in names), body])
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()

    async def __call__(
        self,
        redis: RedisClient,
        keys: Sequence[KeyT] = (),
        args: Sequence[ArgT] = (),
    ) -> Any:
        """Run the script on ``redis`` and return its reply."""
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(self.source, len(keys), *keys, *args)

    async def call_replicated(
        self,
        redis: Redis,
        keys: Sequence[KeyT],
        args: Sequence[ArgT],
        replicas: int,
        timeout_ms: int,
    ) -> tuple[Any, int]:
        """Run the script, then ``WAIT replicas timeout_ms`` on the same connection (one
        pipeline); returns (reply, replicas that confirmed the write).

        With Sentinel, a write only the primary holds is lost if the replica is promoted
        before it replicates, though the caller was told it succeeded (found by
        tests/chaos: acknowledged publishes vanished in a failover).
        """
        for command, script in (("EVALSHA", self.sha), ("EVAL", self.source)):
            pipe = redis.pipeline(transaction=False)
            pipe.execute_command(command, script, len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, timeout_ms)
            try:
                reply, confirmed = await pipe.execute()
            except NoScriptError:
                continue
            return reply, int(confirmed)
        raise NoScriptError(f"script {self.name} could not be loaded")

    def __repr__(self) -> str:
        return f"LuaScript({self.name!r})"


ACQUIRE = LuaScript("acquire")
RENEW = LuaScript("renew", includes=["lease_lib"])
RELEASE = LuaScript("release", includes=["lease_lib"])
CHECK = LuaScript("check", includes=["lease_lib"])
READ_LEASE = LuaScript("read_lease")
PUBLISH = LuaScript("publish")
REPLAY = LuaScript("replay")
# Scheduler: claim a fire (lease check, then the job's last fire moves forward), and
# cluster-wide run-once.
CLAIM_FIRE = LuaScript("claim_fire")
# Runtime jobs: change a definition, pause state or ask for a run (any process), and
# claim a run request (the leader).
JOB_CHANGE = LuaScript("job_change")
JOBS_INDEX = LuaScript("jobs_index")
DUE_PRUNE = LuaScript("due_prune")
CLAIM_RUN = LuaScript("claim_run")
ONCE_BEGIN = LuaScript("once_begin")
ONCE_RENEW = LuaScript("once_renew")
ONCE_END = LuaScript("once_end")
# Shared state: compare-and-set with a version, announced on Pub/Sub.
STATE_SET = LuaScript("state_set")
# Cluster-wide open SSE streams per client: take a slot; renew a process's slots.
STREAM_ACQUIRE = LuaScript("stream_acquire")
STREAM_RENEW = LuaScript("stream_renew")
