"""The demo's own settings (``DEMO_*``), next to coordinator's (``COORDINATOR_*``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DemoSettings(BaseSettings):
    """Job periods and the dashboard channel; defaults suit a live demo."""

    model_config = SettingsConfigDict(env_prefix="DEMO_", frozen=True, extra="ignore")

    channel: str = Field(default="dashboard", description="Channel the dashboard streams.")
    collect_every_s: float = Field(default=5.0, gt=0, description="Metrics collection period.")
    report_cron_second: str = Field(default="*/30", description="Cron 'second' of the report.")
    cleanup_every_s: float = Field(default=60.0, gt=0, description="Cleanup period.")
    fail_fast: bool = Field(default=False, description="Exit at startup if Redis is down.")
    startup_timeout_s: float = Field(default=10.0, gt=0, description="How long fail_fast waits.")
    # Channel authorization (coordinator.web.authz.bearer_token_policy); off unless set.
    publish_token: SecretStr | None = Field(default=None, description="Bearer token to publish.")
    subscribe_token: SecretStr | None = Field(
        default=None, description="Bearer token (or ?access_token=) to subscribe."
    )
