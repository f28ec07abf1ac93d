"""The environment-variable list shown by `piapi-flux-mcp --help`, generated from `Settings`.

Each line comes from the settings model itself (its environment name, its default as this machine
resolves it, its attribute docstring), so a setting added to `Settings` appears in `--help` with no
second list to keep in step.
"""

from __future__ import annotations

import textwrap

from pydantic import AliasChoices
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from flux_mcp.settings import Settings


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a field is read from (PiAPI's own names win over FLUX_MCP_*)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    if isinstance(alias, str):
        return alias
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def default_text(field: FieldInfo) -> str:
    """The default as a user would type it in the environment."""
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    if value is None or value is PydanticUndefined or value == []:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def environment_variables() -> list[tuple[str, str, str]]:
    """`(variable, default, description)` for every setting, in the model's order."""
    return [
        (env_name(name, field), default_text(field), " ".join((field.description or "").split()))
        for name, field in Settings.model_fields.items()
    ]


def environment_help(width: int = 100) -> str:
    lines = ["environment variables (read once at start-up; default in brackets):"]
    for variable, default, description in environment_variables():
        lines.append(f"  {variable} [{default}]")
        if description:
            lines.extend(textwrap.wrap(description, width=width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
