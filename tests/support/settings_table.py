"""The README's settings table, made from :class:`CoordinatorSettings` itself.

``python -m tests.support.settings_table`` prints it; ``tests/test_readme.py``
checks that the README holds exactly this table, so a new or changed setting
cannot go undocumented.
"""

from __future__ import annotations

from typing import Any

from pydantic_core import PydanticUndefined

from coordinator import CoordinatorSettings

ALIASES = {"redis_url": "`COORDINATOR_REDIS_URL` or `REDIS_URL`"}
DYNAMIC_DEFAULTS = {"instance_id": "`hostname-pid-random` (`POD_NAME-pid` on Kubernetes)"}


def _default(name: str, value: Any) -> str:
    if name in DYNAMIC_DEFAULTS:
        return DYNAMIC_DEFAULTS[name]
    if value is PydanticUndefined or value is None:
        return "(unset)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in CoordinatorSettings.model_fields.items():
        variable = ALIASES.get(name, f"`COORDINATOR_{name.upper()}`")
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| {variable} | {_default(name, field.default)} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
