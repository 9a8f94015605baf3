"""``coordinator state list|get|set``, run as a subprocess against real Redis, with a
SharedState in this process that must see what the CLI writes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from coordinator import CoordinatorSettings, EventRelay, SharedState, create_redis

from .support.procs import ROOT

CLI = [sys.executable, "-m", "coordinator.ops.cli", "state"]


def env_for(redis_url: str, namespace: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATOR_")}
    return {**env, "REDIS_URL": redis_url, "COORDINATOR_NAMESPACE": namespace}


async def state_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


async def as_json(env: dict[str, str], *args: str) -> Any:
    done = await state_cli(env, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_set_get_list_and_a_running_process_sees_it(redis_url: str, namespace: str) -> None:
    env = env_for(redis_url, namespace)
    conf = CoordinatorSettings(redis_url=redis_url, namespace=namespace, relay_keepalive_s=1.0)
    redis = create_redis(redis_url)
    relay = EventRelay(conf, redis)
    state = SharedState(conf, redis, relay)
    await relay.start()
    try:
        await state.wait_fresh(10)
        assert await as_json(env, "list") == {"epoch": None, "state": []}
        created = await as_json(env, "set", "flags", '{"dark": true}', "--version", "0")
        assert created == {"key": "flags", "value": {"dark": True}, "version": 1}
        seen = await state.wait_for("flags", 1, timeout=5)  # the process got it over Pub/Sub
        assert seen.value == {"dark": True}

        text = await state_cli(env, "set", "motd", "hello world")  # not JSON: a string
        assert text.returncode == 0 and text.stdout.strip() == 'motd = "hello world" (version 1)'
        got = await as_json(env, "get", "motd")
        assert got == {"key": "motd", "value": "hello world", "version": 1}
        plain = await state_cli(env, "get", "flags")
        assert '"dark": true' in plain.stdout and "(version 1)" in plain.stdout

        listed = await as_json(env, "list")
        assert [e["key"] for e in listed["state"]] == ["flags", "motd"] and listed["epoch"]
        table = (await state_cli(env, "list")).stdout
        assert "flags" in table and "v1" in table and "hello world" in table

        await state.set("flags", {"dark": False})  # version 2, from the process
        conflict = await state_cli(env, "set", "flags", "{}", "--version", "1")
        assert conflict.returncode == 1
        assert "version 2, not 1" in conflict.stderr and "Traceback" not in conflict.stderr
    finally:
        await relay.stop()
        await state.stop()
        await redis.aclose()


async def test_bad_input_and_missing_keys(redis_url: str, namespace: str) -> None:
    env = env_for(redis_url, namespace)
    cases = [
        (("get", "bad key"), 2, "state key 'bad key' is not valid"),
        (("set", "--", "-x", "1"), 2, "state key '-x' is not valid"),
        (("set", "k", "1", "--version", "-1"), 2, "version must be between"),
        (("set", "k", "NaN"), 2, "not JSON"),
        (("get", "missing"), 1, "no state key 'missing'"),
    ]
    for args, code, message in cases:
        done = await state_cli(env, *args)
        assert done.returncode == code, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    big = await state_cli({**env, "COORDINATOR_STATE_MAX_VALUE_BYTES": "10"}, "set", "k", "x" * 20)
    assert big.returncode == 2 and "COORDINATOR_STATE_MAX_VALUE_BYTES" in big.stderr
    down = await state_cli({**env, "REDIS_URL": "redis://127.0.0.1:1/0"}, "list")
    assert down.returncode == 1 and down.stderr.startswith("error:")
