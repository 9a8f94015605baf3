"""Redis replies as Python values: the one bytes-to-text rule."""

from __future__ import annotations


def text(value: object) -> str:
    """A Redis reply as ``str``: ``bytes`` decoded as UTF-8, anything else through ``str()``.

    Raises:
        UnicodeDecodeError: ``bytes`` that are not UTF-8 (coordinator writes only UTF-8).
    """
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
