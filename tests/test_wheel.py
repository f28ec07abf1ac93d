"""The built wheel, installed the way MCP users install servers: `uvx --from <wheel>
piapi-flux-mcp --simulate`, driven by a client we did not write (the MCP Inspector CLI 1.0.3, on
Node). Also checks the wheel's and sdist's metadata. Run with `python3 dev.py wheel`.

Needs `uv` (the `ci` extra) and `npm`; the Inspector CLI is installed once into a cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
INSPECTOR = "@modelcontextprotocol/inspector-cli@1.0.3"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "piapi-flux-mcp-dev"


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        pytest.fail("uv is missing: run through `python3 dev.py wheel`, which installs it")
    return found


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([_uv(), "build", "--out-dir", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def inspector() -> Path:
    """The Inspector CLI, installed once; returns the folder to run it from.

    Its build checks for `../package.json` relative to the working directory, so it must run from a
    folder whose parent holds a package.json: the `run/` folder inside the install.
    """
    if not shutil.which("npm"):
        pytest.fail("npm is needed to install the MCP Inspector CLI")
    home = CACHE / INSPECTOR.replace("/", "_").replace("@", "")
    binary = home / "node_modules" / ".bin" / "mcp-inspector-cli"
    if not binary.exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(home), INSPECTOR],
            check=True,
            capture_output=True,
            timeout=300,
        )
    (home / "run").mkdir(exist_ok=True)
    return home / "run"


def test_wheel_and_sdist_carry_complete_metadata(dist):
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "Name: piapi-flux-mcp" in metadata
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
    assert "Keywords: " in metadata and "Classifier: Topic ::" in metadata and "Project-URL: Repository" in metadata
    assert "mcp-name: io.github." in metadata  # the README is the long description
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "flux_mcp/simulator/app.py" in names and not any(n.startswith("tests/") for n in names)
    assert "piapi-flux-mcp = flux_mcp.cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"LICENSE", "README.md", "pyproject.toml", "flux_mcp/cli.py", "server.json"} <= members


def _inspect(inspector: Path, wheel: Path, tmp_path: Path, *method: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_"))}
    uvx = str(Path(_uv()).with_name("uvx"))
    command = [
        str(inspector.parent / "node_modules" / ".bin" / "mcp-inspector-cli"),
        "--cli",
        "-e", f"FLUX_MCP_OUTPUT_DIR={tmp_path / 'images'}",
        "-e", f"FLUX_MCP_DATA_DIR={tmp_path / 'data'}",
        uvx, "--from", str(wheel), "piapi-flux-mcp", "--simulate",
        *method,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=inspector, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_the_wheel_runs_with_uvx_under_the_inspector_cli(dist, inspector, tmp_path):
    (wheel,) = dist.glob("*.whl")
    tools = _inspect(inspector, wheel, tmp_path, "--method", "tools/list")["tools"]
    names = {tool["name"] for tool in tools}
    assert {"flux_txt2img", "flux_img2img", "flux_wait_task", "flux_list_tasks"} <= names

    result = _inspect(
        inspector, wheel, tmp_path,
        "--method", "tools/call", "--tool-name", "flux_txt2img",
        "--tool-arg", "prompt=a lighthouse at dusk", "--tool-arg", "width=512", "--tool-arg", "height=512",
    )  # fmt: skip
    assert not result.get("isError"), result
    structured = result["structuredContent"]
    assert structured["status"] == "completed"
    (image,) = structured["images"]
    assert Path(image["path"]).is_relative_to(tmp_path / "images")
    with Image.open(image["path"]) as png:
        assert png.size == (512, 512)
    assert {block["type"] for block in result["content"]} >= {"text", "image"}
