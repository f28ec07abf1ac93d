"""Settings: environment names, validation, and the default image roots."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from flux_mcp.settings import ConfigurationError, Settings


def test_environment_names(monkeypatch, tmp_path):
    monkeypatch.setenv("PIAPI_API_KEY", "k-123")
    monkeypatch.setenv("PIAPI_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("FLUX_MCP_WAIT_SECONDS", "12.5")
    monkeypatch.setenv("FLUX_MCP_IMAGE_ROOTS", f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    monkeypatch.setenv("FLUX_MCP_INCLUDE_IMAGE", "none")
    settings = Settings()
    assert settings.require_api_key() == "k-123" and "k-123" not in repr(settings)
    assert settings.base_url == "http://127.0.0.1:9" and settings.wait_seconds == 12.5
    assert settings.allowed_image_roots() == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert settings.include_image == "none"


def test_a_missing_key_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="PIAPI_API_KEY is not set"):
        Settings().require_api_key()


def test_default_roots_are_the_working_directory_and_the_output_directory(monkeypatch, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    settings = Settings(output_dir=tmp_path / "out")
    assert settings.allowed_image_roots() == [project.resolve(), (tmp_path / "out").resolve()]


@pytest.mark.parametrize("cwd", ["/", "home", "above-home"])
def test_a_working_directory_that_would_expose_the_whole_disk_or_home_is_not_a_root(monkeypatch, tmp_path, cwd):
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir({"/": Path("/"), "home": home, "above-home": tmp_path / "users"}[cwd])
    settings = Settings(output_dir=tmp_path / "out")
    assert settings.allowed_image_roots() == [(tmp_path / "out").resolve()]


def test_deployment_options_become_piapi_config(monkeypatch):
    assert Settings().piapi_config() == {}
    monkeypatch.setenv("FLUX_MCP_SERVICE_MODE", "private")
    monkeypatch.setenv("FLUX_MCP_WEBHOOK_ENDPOINT", "https://hooks.example/piapi")
    monkeypatch.setenv("FLUX_MCP_WEBHOOK_SECRET", "s3cr3t")
    settings = Settings()
    assert "s3cr3t" not in repr(settings)
    assert settings.piapi_config() == {
        "webhook_config": {"endpoint": "https://hooks.example/piapi", "secret": "s3cr3t"},
        "service_mode": "private",
    }


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FLUX_MCP_SERVICE_MODE": "vip"}, "service_mode"),
        ({"FLUX_MCP_WEBHOOK_ENDPOINT": "not a url"}, "webhook_endpoint"),
        ({"FLUX_MCP_WEBHOOK_ENDPOINT": "http:///path"}, "webhook_endpoint"),
        ({"FLUX_MCP_WEBHOOK_ENDPOINT": "ftp://hooks.example/x"}, "webhook_endpoint"),
    ],
)
def test_bad_deployment_options_are_refused_at_startup(monkeypatch, env, expected):
    from pydantic import ValidationError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=expected):
        Settings()


def test_generic_api_key_and_base_url_variables_are_not_ours(monkeypatch):
    """An API_KEY or BASE_URL in a host's environment belongs to something else: reading it would
    send requests (and the PiAPI key) to another host."""
    monkeypatch.setenv("API_KEY", "someone-elses-key")
    monkeypatch.setenv("BASE_URL", "http://127.0.0.1:9/elsewhere")
    settings = Settings()
    assert settings.api_key is None and settings.base_url == "https://api.piapi.ai"
    assert Settings(api_key="k-1", base_url="http://127.0.0.1:9/").api_key.get_secret_value() == "k-1"


# --- the environment is read by pydantic-settings' rules, checked against BaseSettings itself ------

_VARIABLES = [
    "PIAPI_API_KEY", "piapi_api_key", "API_KEY", "PIAPI_BASE_URL", "BASE_URL", "FLUX_MCP_API_KEY",
    "FLUX_MCP_BASE_URL", "FLUX_MCP_SIMULATE", "flux_mcp_simulate", "FLUX_MCP_WAIT_SECONDS", "FLUX_MCP_SAVE_IMAGES",
    "FLUX_MCP_OUTPUT_DIR", "FLUX_MCP_DATA_DIR", "FLUX_MCP_INCLUDE_IMAGE", "FLUX_MCP_IMAGE_ROOTS",
    "FLUX_MCP_MAX_INPUT_BYTES", "FLUX_MCP_POLL_BUDGET", "FLUX_MCP_PUBLIC_URL", "FLUX_MCP_DAILY_BUDGET_USD",
    "FLUX_MCP_MAX_CONCURRENT_TASKS", "FLUX_MCP_LOG_LEVEL", "FLUX_MCP_AUTH_TOKEN", "FLUX_MCP_ALLOWED_HOSTS",
    "FLUX_MCP_SERVICE_MODE", "FLUX_MCP_WEBHOOK_ENDPOINT", "FLUX_MCP_WEBHOOK_SECRET", "FLUX_MCP_UNKNOWN",
]  # fmt: skip
_VALUES = [
    "", " ", "0", "1", "-1", "12.5", "true", "no", "abc", "none", "thumbnail", "debug", "public",
    "http://127.0.0.1:9/", "https://example.com/hook", "/tmp/a:/tmp/b", "a.example, [::1]",
    "x" * 20, "[1, 2]", '{"a": 1}',
]  # fmt: skip


def _reference_settings() -> type[Settings]:
    """`Settings` as pydantic-settings' `BaseSettings` would read it (its own reading turned off)."""
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Reference(BaseSettings, Settings):
        model_config = SettingsConfigDict(
            env_prefix="FLUX_MCP_", extra="ignore", populate_by_name=True, enable_decoding=False
        )

        @classmethod
        def from_environment(cls) -> dict[str, str]:
            return {}

    return Reference


def _read(cls: type[Settings], **values: object) -> object:
    from pydantic import ValidationError

    from flux_mcp.startup import describe_settings_error

    try:
        return cls(**values).model_dump()
    except ValidationError as exc:
        return describe_settings_error(exc)


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    env=st.dictionaries(st.sampled_from(_VARIABLES), st.sampled_from(_VALUES), max_size=6),
    key=st.sampled_from([{}, {"api_key": "from-argument"}, {"PIAPI_API_KEY": "from-argument"}]),
)
def test_the_environment_is_read_as_pydantic_settings_reads_it(env, key):
    reference = _reference_settings()
    with mock.patch.dict(os.environ, env):
        assert _read(Settings, **key) == _read(reference, **key)
