"""The command line as a user meets it: startup errors, the standalone simulator, the demo."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import httpx2
import pytest
from PIL import Image

SEED_REQUEST = {
    "model": "Qubico/flux1-dev",
    "task_type": "txt2img",
    "input": {"prompt": "a little cat", "width": 1024, "height": 1024},
}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_"))}
    return subprocess.run(
        [sys.executable, "-m", "flux_mcp", *args],
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "PIAPI_API_KEY is not set"),
        ({"PIAPI_API_KEY": "k", "PIAPI_BASE_URL": "ftp://example"}, "invalid setting PIAPI_BASE_URL='ftp://example'"),
        ({"PIAPI_API_KEY": "k", "FLUX_MCP_WAIT_SECONDS": "-1"}, "invalid setting FLUX_MCP_WAIT_SECONDS='-1'"),
        ({"FLUX_MCP_SIMULATE": "maybe"}, "invalid setting FLUX_MCP_SIMULATE='maybe'"),
        ({"FLUX_MCP_SIMULATE": "1", "FLUX_MCP_ALLOWED_HOSTS": "ok.example,bad:80"}, "FLUX_MCP_ALLOWED_HOSTS="),
    ],
)
def test_bad_configuration_is_one_line_on_stderr_before_any_transport(env, expected):
    result = run_cli(env=env, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""  # stdout belongs to the protocol
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--simulate"],
        ["--simulate", "serve"],
        ["serve", "--simulate"],
        ["--simulate", "serve", "--transport", "http"],
        ["serve", "--transport", "http", "--simulate"],
    ],
)
def test_global_options_work_before_or_after_the_subcommand(argv):
    from flux_mcp.cli import _load_settings, build_parser

    assert _load_settings(build_parser().parse_args(argv)).simulate is True


def test_a_secret_setting_is_named_but_its_value_never_shown():
    result = run_cli(env={"FLUX_MCP_SIMULATE": "1", "FLUX_MCP_AUTH_TOKEN": "short-secret"}, timeout=30)
    assert result.returncode == 2
    assert "invalid setting FLUX_MCP_AUTH_TOKEN:" in result.stderr
    assert "short-secret" not in result.stderr + result.stdout


@pytest.mark.parametrize("variable", ["FLUX_MCP_DATA_DIR", "FLUX_MCP_OUTPUT_DIR"])
@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_a_folder_that_is_a_file_stops_the_server_at_once_with_one_line(tmp_path, variable, transport):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file")
    env = {
        "FLUX_MCP_SIMULATE": "1",
        "FLUX_MCP_DATA_DIR": str(tmp_path / "data"),
        "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images"),
        variable: str(blocker / "sub") if transport == "http" else str(blocker),
    }
    port = str(free_port())
    result = run_cli("serve", "--transport", transport, "--port", port, env=env, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""  # nothing sent
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"piapi-flux-mcp: {variable}='{blocker}")
    assert "not a writable folder" in lines[0]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_a_read_only_output_folder_stops_the_server(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = run_cli(
            env={
                "FLUX_MCP_SIMULATE": "1",
                "FLUX_MCP_DATA_DIR": str(tmp_path / "data"),
                "FLUX_MCP_OUTPUT_DIR": str(folder),
            },
            timeout=30,
        )
    finally:
        folder.chmod(0o700)
    assert result.returncode == 2
    assert "FLUX_MCP_OUTPUT_DIR=" in result.stderr and "not a writable folder" in result.stderr


def test_the_api_key_is_never_echoed():
    result = run_cli(env={"PIAPI_API_KEY": "sk-secret-value", "PIAPI_BASE_URL": "nope"}, timeout=30)
    assert "sk-secret-value" not in result.stderr + result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_standalone_simulator_completes_the_seed_request_with_a_downloadable_png(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_mcp", "simulator", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        headers = {"X-API-Key": "sim-key"}
        deadline = time.monotonic() + 15
        while True:
            try:
                created = httpx2.post(f"{base}/api/v1/task", json=SEED_REQUEST, headers=headers)
                break
            except httpx2.ConnectError:
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.1)
        assert created.status_code == 200 and created.json()["code"] == 200
        task_id = created.json()["data"]["task_id"]
        while True:
            data = httpx2.get(f"{base}/api/v1/task/{task_id}", headers=headers).json()["data"]
            if data["status"] == "completed":
                break
            assert time.monotonic() < deadline, data["status"]
            time.sleep(0.2)
        image = httpx2.get(data["output"]["image_url"])
        assert image.headers["content-type"] == "image/png"
        (tmp_path / "cat.png").write_bytes(image.content)
        with Image.open(tmp_path / "cat.png") as png:
            assert png.size == (1024, 1024)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_demo_runs_every_task_tool_to_completion_in_fresh_state_each_run(tmp_path):
    runs = []
    for _ in range(2):  # a second run straight after the first sees none of its tasks
        result = run_cli("demo", "--output-dir", str(tmp_path / "demo"), timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "all tools completed" in result.stdout
        assert "reattached=True" in result.stdout  # its own repeat, and only that
        assert "(re-attached)" not in result.stdout
        assert "first call: processing" in result.stdout  # the task did outlive its wait
        runs.append(result.stdout)
    folders = sorted((tmp_path / "demo").iterdir())
    assert len(folders) == 2
    for folder in folders:
        images = sorted((folder / "images").glob("*.png"))
        sidecars = sorted((folder / "images").glob("*.json"))
        assert len(images) == len(sidecars) >= 10
        assert json.loads(sidecars[0].read_text())["sha256"]
        assert (folder / "data" / "tasks.sqlite3").is_file()
    task_id = re.compile(r"task ([0-9a-f]{8}-[0-9a-f-]{27})")
    first_ids, second_ids = (set(task_id.findall(run)) for run in runs)
    assert len(first_ids) >= 10 and not first_ids & second_ids


def test_the_bare_command_is_what_the_parser_gives_for_no_arguments():
    # `piapi-flux-mcp` with no arguments (how MCP hosts start it) skips building the parser.
    from flux_mcp.cli import BARE_COMMAND, build_parser

    assert vars(build_parser().parse_args([])) == BARE_COMMAND
