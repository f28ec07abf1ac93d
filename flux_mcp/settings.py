"""Configuration from the environment, validated before any transport opens.

PiAPI's own names are kept for the two upstream settings (`PIAPI_API_KEY`, `PIAPI_BASE_URL`);
everything that belongs to this server is `FLUX_MCP_*`. The key is a `SecretStr`, so it prints
as `**********` in any repr, log line or error.

`Settings` is a plain pydantic model that reads the environment when it is created, by the rules
of pydantic-settings' `BaseSettings` (which importing would cost every start more than the rest of
this module): each field from its string aliases in order, then `FLUX_MCP_<NAME>`, names matched
whatever their case, values validated as given (lists split by their own validators), defaults
validated too, and arguments to `Settings(...)` taking precedence over the environment.
tests/test_settings.py checks it against `BaseSettings` itself.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo

APP_NAME = "piapi-flux-mcp"
ENV_PREFIX = "FLUX_MCP_"
DEFAULT_BASE_URL = "https://api.piapi.ai"

IncludeImage = Literal["none", "thumbnail"]
SIMULATED_SUBDIR = "simulator"
DEFAULT_POLL_BUDGET = 14  # planned GETs per task (short tasks up to 1.5x); a typical task uses about half to two thirds


def default_output_dir() -> Path:
    return Path(platformdirs.user_pictures_dir()) / APP_NAME


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


MIN_TOKEN_LENGTH = 16


def _host_name(entry: str) -> str:
    """One FLUX_MCP_ALLOWED_HOSTS entry as the bare host a Host header carries: `mcp.example.com`,
    `10.0.0.5`, `[fd00::5]` (an IPv6 address gets its brackets). No scheme, port, path or wildcard."""
    host = entry.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if ":" in host:
            return f"[{ipaddress.IPv6Address(host)}]"
    except ValueError:
        pass
    else:
        if re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", host):
            return host
    raise ValueError(f"{entry.strip()!r} is not a host name (list bare names, without scheme or port)")


class ConfigurationError(ValueError):
    """Bad configuration, reported as one line before the server starts."""


def environment_names(name: str, field: FieldInfo) -> list[str]:
    """The environment variables a setting is read from, first found wins: its string aliases
    (PiAPI's own names first), then `FLUX_MCP_<NAME>` (settings are populated by name too)."""
    alias = field.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    return [*(c for c in choices if isinstance(c, str)), f"{ENV_PREFIX}{name}".upper()]


class Settings(BaseModel):
    # Each field's docstring is its --help text (settings_help reads them when help is asked for;
    # pydantic's use_attribute_docstrings would search every loaded module's source at import).
    model_config = ConfigDict(extra="ignore", populate_by_name=True, validate_default=True)

    def __init__(self, **values: Any) -> None:
        """The environment as it is now, overridden by `values`."""
        super().__init__(**(type(self).from_environment() | values))

    @classmethod
    def from_environment(cls) -> dict[str, str]:
        """Each setting the environment gives, by field name (variable names matched whatever their case)."""
        environ = {key.lower(): value for key, value in os.environ.items()}
        found = {}
        for name, field in cls.model_fields.items():
            variable = next((v.lower() for v in environment_names(name, field) if v.lower() in environ), None)
            if variable is not None:
                found[name] = environ[variable]
        return found

    # Only PiAPI's own names (and FLUX_MCP_<NAME>): a generic API_KEY or BASE_URL in a host's
    # environment belongs to something else and must never send the key to another host.
    api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("PIAPI_API_KEY"))
    """Your PiAPI key; required unless simulating. Never printed, logged or returned."""
    base_url: str = Field(default=DEFAULT_BASE_URL, validation_alias=AliasChoices("PIAPI_BASE_URL"))
    """PiAPI endpoint."""
    simulate: bool = False
    """Run against the built-in PiAPI simulator (same as --simulate): no key, no cost."""
    wait_seconds: float = Field(default=45.0, ge=0, le=600)
    """Default wait_seconds for task tools and flux_wait_task."""
    save_images: bool = True
    """false = keep PiAPI's URLs only, save nothing."""
    output_dir: Path = Field(default_factory=default_output_dir)
    """Where images and their JSON sidecars are saved."""
    data_dir: Path = Field(default_factory=default_data_dir)
    """Where the task ledger (tasks.sqlite3) lives."""
    include_image: IncludeImage = "thumbnail"
    """Default inline preview in results: thumbnail or none."""
    image_roots: list[Path] = Field(default_factory=list)
    """Folders local input images may be read from (os.pathsep-separated); unset = the working
    directory (unless it is / or home) and the output directory."""
    idempotency_window_seconds: float = Field(default=600.0, ge=0)
    """How long an identical request re-attaches to its task; 0 = off."""
    max_download_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    """Size cap per downloaded image."""
    max_input_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    """Size cap per local input image."""
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    """Per-request HTTP timeout to PiAPI."""
    poll_budget: int = Field(default=DEFAULT_POLL_BUDGET, ge=1, le=100)
    """Planned status GETs per task before the slow tail (the learned schedule places them; tasks of a
    few seconds get up to 1.5 times as many, closer together)."""
    public_url: str | None = None
    """HTTP only: the base URL PiAPI can reach this server at; tasks then report back to
    <public_url>/webhooks/piapi and polling becomes a sparse safety net."""
    daily_budget_usd: float | None = Field(default=None, ge=0)
    """Most USD the task tools may spend per UTC day, across processes sharing the ledger; unset = no limit."""
    confirm_above_usd: float | None = Field(default=None, ge=0)
    """A call costing more than this (USD) asks the user to confirm first; unset = never ask."""
    max_concurrent_tasks: int | None = Field(default=None, ge=1)
    """Most tasks running at PiAPI at once (your plan's concurrent jobs), across processes sharing
    the ledger; more wait their turn locally. Unset = no limit."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    """Log level; logs go to stderr only."""
    # HTTP transport (see flux_mcp.http_app): who may call, under which Host names, how many sessions.
    auth_token: SecretStr | None = None
    """HTTP only: the bearer token clients must send (16+ characters); required beyond loopback. Never printed."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """HTTP only: extra host names (comma-separated, no port) clients may reach the server under, besides loopback."""
    max_sessions: int = Field(default=1000, gt=0)
    """HTTP only: open sessions at once; one more is refused with 503."""
    session_idle_seconds: float = Field(default=1800.0, gt=0, le=86400)
    """HTTP only: a session with no request for this long is closed."""
    # Deployment choices passed through to PiAPI's `config` on every task (not per-image tool options).
    service_mode: Literal["public", "private"] | None = None
    """PiAPI's config.service_mode for every task: public or private."""
    webhook_endpoint: str | None = None
    """PiAPI's config.webhook_config.endpoint for every task (http(s)://...), sent with webhook_secret."""
    webhook_secret: SecretStr | None = None
    """The webhook secret PiAPI sends in x-webhook-secret (for webhook_endpoint, or our own receiver,
    which otherwise makes one and keeps it beside the ledger). Never printed."""

    @field_validator("image_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        # FLUX_MCP_IMAGE_ROOTS is a path list in the platform's PATH syntax ("a:b" or "a;b").
        if isinstance(value, str):
            return [p for p in value.split(os.pathsep) if p.strip()]
        return value

    @field_validator("auth_token")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None  # unset or blank: no token
        token = value.get_secret_value()
        if len(token) < MIN_TOKEN_LENGTH or token != token.strip() or not token.isascii():
            raise ValueError(
                f"must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without surrounding spaces "
                "(e.g. the output of: python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        # FLUX_MCP_ALLOWED_HOSTS: comma-separated host names, each allowed on any port.
        if isinstance(value, str):
            value = [h for h in value.split(",") if h.strip()]
        if isinstance(value, list):
            return [_host_name(str(h)) for h in value]
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https:// (the base URL PiAPI can reach)")
        return value.rstrip("/")

    @field_validator("webhook_endpoint", "service_mode", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_endpoint")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is None:
            return None  # unset: no need to load the catalog
        from flux_mcp.catalog import check_http_url  # the same rule as every URL argument

        return check_http_url(value)

    def piapi_config(self) -> dict[str, Any]:
        """PiAPI's per-task `config` for this deployment (empty when nothing is configured)."""
        config: dict[str, Any] = {}
        if self.webhook_endpoint:
            secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
            config["webhook_config"] = {"endpoint": self.webhook_endpoint, "secret": secret}
        if self.service_mode:
            config["service_mode"] = self.service_mode
        return config

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def state_dir(self) -> Path:
        """Where the ledger lives. `--simulate` keeps its own ledger and images apart from real
        ones (a `simulator` sub-folder), so a simulated task can never stand in for a paid one."""
        return self.data_dir / SIMULATED_SUBDIR if self.simulate else self.data_dir

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "tasks.sqlite3"

    @property
    def images_dir(self) -> Path:
        """Where images are saved: the output directory, or its `simulator` sub-folder."""
        return self.output_dir / SIMULATED_SUBDIR if self.simulate else self.output_dir

    def allowed_image_roots(self) -> list[Path]:
        """Where local input images may be read from: the configured roots, else the working
        directory and the output directory.

        Hosts start servers with odd working directories (Claude Desktop uses `/`, others the home
        directory), and a root there would open every picture on the disk to an agent. So the
        working directory is a default root only when it is neither the filesystem root nor the
        home directory nor above it; FLUX_MCP_IMAGE_ROOTS can still name any folder explicitly.
        """
        if self.image_roots:
            return [Path(r).expanduser().resolve() for r in self.image_roots]
        cwd, home = Path.cwd().resolve(), Path.home().resolve()
        too_broad = cwd == Path(cwd.anchor) or home == cwd or home.is_relative_to(cwd)
        roots = [self.output_dir] if too_broad else [cwd, self.output_dir]
        return [Path(r).expanduser().resolve() for r in roots]

    def require_api_key(self) -> str:
        if self.api_key is None or not self.api_key.get_secret_value().strip():
            raise ConfigurationError(
                "PIAPI_API_KEY is not set. Set it to your PiAPI key, or run with --simulate "
                "(FLUX_MCP_SIMULATE=1) to try the server against the built-in simulator."
            )
        return self.api_key.get_secret_value().strip()
