"""The server uses only the MCP SDK's public API: no `_`-prefixed SDK module, name or attribute.

The check reads our sources with `ast`. An attribute access `x._name` is flagged when `_name` is
something the SDK (`mcp`, `mcp_types`) defines and our package does not (our own classes keep
their own `_private` helpers); an import is flagged when it names a private SDK module or name.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import flux_mcp

OUR_PACKAGE = Path(flux_mcp.__file__).parent
SDK_PACKAGES = ("mcp", "mcp_types")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def _defined_private_names(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return {n for n in names if _private(n)}


def _sdk_private_names() -> set[str]:
    names: set[str] = set()
    for package in SDK_PACKAGES:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations
        names |= _defined_private_names(_sources(Path(next(iter(spec.submodule_search_locations)))))
    return names


def violations(source: str, *, sdk_private: set[str], ours: set[str]) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if node.attr in sdk_private and node.attr not in ours:
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in SDK_PACKAGES:
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"line {node.lineno}: from {node.module}")
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in SDK_PACKAGES and any(_private(p) for p in parts):
                    found.append(f"line {node.lineno}: import {alias.name}")
    return found


def test_no_private_sdk_name_is_used():
    ours_paths = _sources(OUR_PACKAGE)
    sdk_private = _sdk_private_names()
    ours = _defined_private_names(ours_paths)
    problems = {
        str(path.relative_to(OUR_PACKAGE.parent)): found
        for path in ours_paths
        if (found := violations(path.read_text(encoding="utf-8"), sdk_private=sdk_private, ours=ours))
    }
    assert problems == {}


def test_the_check_catches_what_the_server_used_to_do():
    sdk_private = _sdk_private_names()
    before = """
from mcp.server._streamable_http_modern import handle_modern_request
from mcp.server.mcpserver.server import _version_gated
tool = mcp._tool_manager.get_tool(name)
prompt = self._prompt_manager.get_prompt(name)
"""
    assert len(violations(before, sdk_private=sdk_private, ours=set())) == 4
