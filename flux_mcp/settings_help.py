"""The environment-variable list shown by `piapi-flux-mcp --help`, generated from `Settings`.

Each line comes from the settings model itself (its environment name, its default as this machine
resolves it, its attribute docstring), so a setting added to `Settings` appears in `--help` with no
second list to keep in step. The docstrings are read from `Settings`' source only here, when help
is asked for, so a server start does not pay for it.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import textwrap

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from flux_mcp.settings import Settings, environment_names


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a field is documented under (PiAPI's own names win over FLUX_MCP_*)."""
    return environment_names(name, field)[0]


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


def attribute_docstrings(cls: type) -> dict[str, str]:
    """The string literal right under each annotated attribute of `cls` (`name: type = ...`)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: inspect.cleandoc(doc.value.value)
        for node, doc in itertools.pairwise(body)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
    }  # fmt: skip


def environment_variables() -> list[tuple[str, str, str]]:
    """`(variable, default, description)` for every setting, in the model's order."""
    docs = attribute_docstrings(Settings)
    return [
        (env_name(name, field), default_text(field), " ".join((field.description or docs.get(name, "")).split()))
        for name, field in Settings.model_fields.items()
    ]


def environment_help(width: int = 100) -> str:
    lines = ["environment variables (read once at start-up; default in brackets):"]
    for variable, default, description in environment_variables():
        lines.append(f"  {variable} [{default}]")
        if description:
            lines.extend(textwrap.wrap(description, width=width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)
