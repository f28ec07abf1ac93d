"""Start-up checks, before any transport opens: each failure is one `ConfigurationError` line that
names the environment variable the user set and the value it had (never a secret's value).

- `load_settings` reads the environment; a bad value reads
  `invalid setting FLUX_MCP_WAIT_SECONDS='-1': Input should be greater than or equal to 0`.
- `check_folders` creates the data folder (and the output folder when images are saved) and proves
  each writable, so a folder that is a file or read-only stops the server at once instead of
  failing every call later.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from flux_mcp.settings import ConfigurationError, Settings

_SHOWN_CHARS = 80


def _variables() -> dict[str, tuple[str, FieldInfo]]:
    """Every name a validation error may carry (field name or alias) -> (environment variable, field)."""
    from flux_mcp.settings_help import env_name  # --help's module: loaded only when something is wrong

    names: dict[str, tuple[str, FieldInfo]] = {}
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        aliases = [a for a in alias.choices if isinstance(a, str)] if isinstance(alias, AliasChoices) else []
        for key in (name, *aliases):
            names[key] = (env_name(name, field), field)
    return names


def describe_settings_error(exc: ValidationError) -> str:
    """One line naming each bad variable and its value (a secret's value is never shown)."""
    variables = _variables()
    parts = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        variable, field = variables.get(key, (key or "settings", None))
        secret = field is not None and "SecretStr" in str(field.annotation)
        value = error.get("input")
        shown = "" if secret or isinstance(value, dict) else f"={_shown(value)}"
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{variable}{shown}: {message}")
    return "invalid setting " + "; ".join(parts)


def _shown(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "'**********'"
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 4] + "...'"


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and `overrides`), or a one-line `ConfigurationError`."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_settings_error(exc)) from None


def check_folders(settings: Settings) -> None:
    """Create the data folder (and the output folder when saving images) and prove each writable."""
    # The folders really used: with --simulate, their `simulator` sub-folders.
    folders = [("FLUX_MCP_DATA_DIR", settings.state_dir)]
    if settings.save_images:
        folders.append(("FLUX_MCP_OUTPUT_DIR", settings.images_dir))
    for variable, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if folder.exists() and not folder.is_dir():
                reason = "it is a file, not a folder"
            elif isinstance(exc, FileExistsError | NotADirectoryError):
                reason = "a part of the path is a file, not a folder"
            raise ConfigurationError(f"{variable}={str(folder)!r} is not a writable folder: {reason}") from None
