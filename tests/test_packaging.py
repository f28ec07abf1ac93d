"""What a user or a registry sees before running anything: metadata, LICENSE, server.json, --help,
--version and the Dockerfile.

The MCP registry's server.json schema is not shipped by any package on PyPI or npm, so
`REGISTRY_RULES` below restates its documented constraints (2025-09-29 schema: required fields,
name pattern, lengths, package and environment-variable shapes, no `latest`) and server.json is
validated against that with jsonschema.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from flux_mcp import __version__
from flux_mcp.settings import Settings
from flux_mcp.settings_help import environment_variables

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVER_JSON = json.loads((ROOT / "server.json").read_text())

_INPUT = {
    "type": "object",
    "properties": {
        "description": {"type": "string"},
        "isRequired": {"type": "boolean"},
        "format": {"enum": ["string", "number", "boolean", "filepath"]},
        "value": {"type": "string"},
        "isSecret": {"type": "boolean"},
        "default": {"type": "string"},
        "placeholder": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "string"}},
    },
}
REGISTRY_RULES = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["name", "description", "version"],
    "properties": {
        "$schema": {"const": "https://static.modelcontextprotocol.io/schemas/2025-09-29/server.schema.json"},
        "name": {"type": "string", "pattern": r"^[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+$", "minLength": 3, "maxLength": 200},
        "description": {"type": "string", "minLength": 1, "maxLength": 100},
        "version": {"type": "string", "maxLength": 255, "not": {"pattern": r"^[\^~><=]|\.x$|\*"}},
        "websiteUrl": {"type": "string", "format": "uri"},
        "repository": {
            "type": "object",
            "required": ["url", "source"],
            "properties": {"url": {"type": "string", "format": "uri"}, "source": {"type": "string"}},
        },
        "packages": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["registryType", "identifier", "version", "transport"],
                "properties": {
                    "registryType": {"type": "string"},
                    "registryBaseUrl": {"type": "string", "format": "uri"},
                    "identifier": {"type": "string"},
                    "version": {"type": "string", "minLength": 1, "not": {"const": "latest"}},
                    "fileSha256": {"type": "string", "pattern": "^[a-f0-9]{64}$"},
                    "runtimeHint": {"type": "string"},
                    "transport": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {"type": {"enum": ["stdio", "streamable-http", "sse"]}},
                    },
                    "runtimeArguments": {"type": "array"},
                    "packageArguments": {"type": "array"},
                    "environmentVariables": {
                        "type": "array",
                        "items": {"allOf": [_INPUT, {"type": "object", "required": ["name"]}]},
                    },
                },
            },
        },
    },
}


def test_server_json_follows_the_registry_rules():
    jsonschema.Draft7Validator.check_schema(REGISTRY_RULES)
    validator = jsonschema.Draft7Validator(REGISTRY_RULES, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    assert sorted(e.message for e in validator.iter_errors(SERVER_JSON)) == []


STDIO = {"type": "stdio"}


@pytest.mark.parametrize(
    "broken",
    [
        {"name": "no-slash"},
        {"description": "x" * 101},
        {"packages": [{"registryType": "pypi", "identifier": "p", "version": "latest", "transport": STDIO}]},
        {"packages": [{"registryType": "pypi", "identifier": "p", "version": "1", "transport": STDIO, "extra": 1}]},
        {"packages": [{"registryType": "pypi", "identifier": "p", "version": "1", "transport": {}}]},
    ],
)
def test_the_registry_rules_reject_what_the_registry_rejects(broken):
    assert not jsonschema.Draft7Validator(REGISTRY_RULES).is_valid(SERVER_JSON | broken)


def test_server_json_matches_the_package():
    project = PYPROJECT["project"]
    (package,) = SERVER_JSON["packages"]
    assert SERVER_JSON["version"] == package["version"] == project["version"] == __version__
    assert package["identifier"] == project["name"] and package["registryType"] == "pypi"
    assert SERVER_JSON["repository"]["url"] == project["urls"]["Repository"]
    # The registry proves ownership of a PyPI package by this line in its README (the long description).
    assert f"mcp-name: {SERVER_JSON['name']}" in (ROOT / project["readme"]).read_text()


def test_server_json_environment_variables_are_real_settings_with_the_same_defaults():
    settings = {name: default for name, default, _ in environment_variables()}
    for variable in SERVER_JSON["packages"][0]["environmentVariables"]:
        assert variable["name"] in settings
        if "default" in variable:
            assert variable["default"] == settings[variable["name"]]
        if variable["name"] == "PIAPI_API_KEY":
            assert variable["isSecret"] is True


def test_metadata_is_complete():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert project["keywords"] and any(c.startswith("Topic ::") for c in project["classifiers"])
    assert {"Homepage", "Repository", "Issues"} <= set(project["urls"])
    assert project["scripts"] == {"piapi-flux-mcp": "flux_mcp.cli:main"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_"))}
    return subprocess.run(
        [sys.executable, "-m", "flux_mcp", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_version_is_the_package_version():
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"piapi-flux-mcp {PYPROJECT['project']['version']}"


def test_help_lists_every_setting_with_its_default_and_says_what_the_bare_command_does():
    result = _cli("--help")
    assert result.returncode == 0
    assert "Run with no command, it serves MCP over stdio" in " ".join(result.stdout.split())
    listed = dict(re.findall(r"^  ([A-Z][A-Z0-9_]+) \[(.*)\]$", result.stdout, flags=re.MULTILINE))
    assert set(listed) == {name for name, _, _ in environment_variables()}
    assert len(listed) == len(Settings.model_fields)
    assert listed["PIAPI_API_KEY"] == "unset"
    assert listed["FLUX_MCP_WAIT_SECONDS"] == "45"
    assert listed["PIAPI_BASE_URL"] == Settings.model_fields["base_url"].default
    # Each with its description, read from the field's docstring in `Settings`.
    assert all(description for _, _, description in environment_variables())
    assert "      Per-request HTTP timeout to PiAPI.\n" in result.stdout


def test_dockerfile_runs_http_as_a_non_root_user_and_requires_the_token():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    entrypoint = next(line for line in instructions if line.startswith("ENTRYPOINT"))
    assert "--transport http" in entrypoint and "FLUX_MCP_AUTH_TOKEN" in entrypoint
    # No secret baked in: neither the key nor the token is given a value anywhere in the image.
    assert not re.search(r"(PIAPI_API_KEY|FLUX_MCP_AUTH_TOKEN)\s*=", " ".join(i for i in instructions if "ENV" in i))
    assert not any(i.startswith(("ARG PIAPI", "ARG FLUX_MCP_AUTH")) for i in instructions)


def test_docker_entrypoint_refuses_to_start_without_the_token():
    entrypoint = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    argv = json.loads(entrypoint.removeprefix("ENTRYPOINT"))
    env = {"PATH": os.environ["PATH"]}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 2 and "set FLUX_MCP_AUTH_TOKEN" in result.stderr


def test_the_readme_settings_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Settings", 1)[1].split("\n## ", 1)[0]
    missing = [name for name, _, _ in environment_variables() if f"| `{name}` |" not in table]
    assert missing == []


def test_the_readme_exit_code_table_matches_the_command():
    from flux_mcp.generate import EXIT_MEANINGS

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From the terminal", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+) \|$", section, flags=re.MULTILINE))
    assert sorted(map(int, rows)) == sorted(EXIT_MEANINGS)


def test_the_readme_quickstart_is_the_two_dev_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == [
        "python3 dev.py demo",
        "python3 dev.py test",
    ]


def test_every_host_snippet_starts_the_server_with_uvx():
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Install in your MCP host", 1)[1].split("\n## ", 1)[0]
    for host in ("Claude Desktop", "Claude Code", "Cursor", "Windsurf", "VS Code"):
        assert f"**{host}**" in install
    blocks = re.findall(r"```json\n(.*?)```", install, flags=re.DOTALL)
    for block in blocks:
        config = json.loads(block)
        servers = config.get("mcpServers") or config["servers"]
        assert servers["flux"]["command"] == "uvx" and servers["flux"]["args"][0] == "piapi-flux-mcp"
        assert "PIAPI_API_KEY" in servers["flux"]["env"]
    assert "claude mcp add flux --env PIAPI_API_KEY=" in install and "-- uvx piapi-flux-mcp" in install


@pytest.mark.parametrize(
    ("arguments", "cores", "expected"),
    [
        ([], 2, ["-n", "2"]),
        (["tests/test_cli.py"], 16, ["-n", "4"]),  # at most 4: timing tests share the machine
        ([], 1, []),
        (["-n", "0"], 2, []),  # told how many
        (["-n2"], 8, []),
        (["--numprocesses=3"], 8, []),
        (["--pdb"], 8, []),  # a debugger wants the one process
        (["-p", "no:xdist"], 8, []),
    ],
)
def test_dev_test_runs_the_suite_on_one_process_per_core_unless_told(monkeypatch, arguments, cores, expected):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    monkeypatch.setattr(dev.os, "cpu_count", lambda: cores)
    assert dev._workers(arguments) == expected
