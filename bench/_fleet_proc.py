"""One process of ``bench/fleet.py``: a relay with subscribers, or a publisher.

    python bench/_fleet_proc.py listen URL NAMESPACE CHANNELS   (comma-separated)
    python bench/_fleet_proc.py publish URL NAMESPACE CHANNEL_COUNT RATE

It imports ``coordinator`` from wherever ``sys.path`` finds it first, so the parent
can run an earlier version of the relay (``PYTHONPATH`` to an export of that commit).
Prints ``ready`` once set up, runs until a line arrives on stdin, then prints one JSON
line with what it measured and exits.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import coordinator
from coordinator import CoordinatorSettings, EventRelay


async def listen(url: str, namespace: str, channels: list[str]) -> dict[str, object]:
    relay = EventRelay(CoordinatorSettings(redis_url=url, namespace=namespace))
    await relay.start()
    await relay.wait_ready(60)
    lags: list[float] = []
    subs = [await relay.subscribe(channel) for channel in channels]

    def consumer(sub: object) -> object:
        def ready() -> None:
            while (chunk := sub.take()) is not None:  # type: ignore[attr-defined]
                now = time.time()
                for line in chunk.split(b"\n"):
                    if line.startswith(b"data: "):
                        lags.append(now - json.loads(line[6:])["t"])

        return ready

    for sub in subs:
        sub.consume(consumer(sub))  # type: ignore[arg-type]
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    received = relay.stats.events_received
    await relay.stop()
    return {"lags": lags, "received": received, "module": coordinator.__file__}


async def publish(url: str, namespace: str, channels: int, rate: float) -> dict[str, object]:
    relay = EventRelay(CoordinatorSettings(redis_url=url, namespace=namespace))
    print("ready", flush=True)
    stop = asyncio.ensure_future(
        asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    )
    rng = random.Random()
    sent = failed = 0
    kinds: dict[str, int] = {}
    tick = 0.01
    start = time.monotonic()
    while not stop.done():
        due = int((time.monotonic() - start) * rate) - sent - failed
        if due > 0:
            # At most 64 in flight: redis-py's pool refuses a 101st connection ("Too many
            # connections") rather than queue; a publisher that falls behind shows as a
            # lower events/s instead.
            results = await asyncio.gather(
                *(
                    relay.publish(f"ch{rng.randrange(channels)}", {"t": time.time()})
                    for _ in range(min(due, 64))
                ),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException):
                    failed += 1
                    kind = f"{type(r).__name__}: {str(r).split(': ')[-1][:120]}"
                    kinds[kind] = kinds.get(kind, 0) + 1
                else:
                    sent += 1
        await asyncio.sleep(tick)
    await relay.stop()
    return {"sent": sent, "failed": failed, "errors": kinds, "seconds": time.monotonic() - start}


def main() -> None:
    mode, url, namespace, *rest = sys.argv[1:]
    if mode == "listen":
        result = asyncio.run(listen(url, namespace, rest[0].split(",")))
    else:
        result = asyncio.run(publish(url, namespace, int(rest[0]), float(rest[1])))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
