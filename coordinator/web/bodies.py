"""Request bodies read the one way every route of the library (and the demo) reads them.

Routes that take JSON read the body themselves instead of letting FastAPI parse it:
the size is checked while reading (a 413 before a huge body is held in memory), and
every malformed body gets a 4xx that says what is wrong, where FastAPI's own 422 would
echo the input back and fails to render a non-finite number (a 500).
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException, Request


class InvalidJSONError(ValueError):
    """A body that is not strict JSON: malformed, nested too deeply, or holding a
    number that is not finite (``NaN``, ``Infinity``, ``1e999``)."""


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:32]} is out of range")
    return number


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON (finite numbers only).

    Raises:
        InvalidJSONError: saying what is wrong, in at most a few hundred characters.
    """
    try:
        return json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except ValueError as exc:
        raise InvalidJSONError(f"body is not valid JSON: {exc}"[:300]) from None
    except RecursionError:
        raise InvalidJSONError("body is nested too deeply") from None


async def read_body(request: Request, limit: int, headers: dict[str, str]) -> bytes:
    """The raw body, or a 413 as soon as it passes ``limit`` bytes."""
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise HTTPException(413, f"body over {limit} bytes", headers=headers)
    return bytes(raw)


async def read_json(request: Request, limit: int, headers: dict[str, str]) -> Any:
    """The body as strict JSON: 413 over ``limit`` bytes, 422 saying what is wrong."""
    raw = await read_body(request, limit, headers)
    try:
        return parse_json(raw)
    except InvalidJSONError as exc:
        raise HTTPException(422, str(exc), headers=headers) from None
