"""Every program in `examples/` runs, each in its own venv made from its own requirements file,
against the built-in simulator (no key, no LLM), and produces an image. Run with
`python3 dev.py examples`.

The venvs are made with uv and kept in a cache folder keyed by the requirements file's content and
the Python version, so a second run installs nothing. The examples start the server with the
command in `PIAPI_FLUX_MCP`: here, this checkout's `piapi-flux-mcp` (the server keeps its own
environment, which is how langchain-mcp-adapters, still on the 1.x SDK, can talk to it).
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.examples

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(path.parent for path in (ROOT / "examples").glob("*/requirements.txt"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "piapi-flux-mcp-dev" / "examples"


def _uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        pytest.fail("uv is missing: run through `python3 dev.py examples`, which installs it")
    return found


def example_python(example: Path) -> Path:
    """The example's own venv, made once per requirements file and Python version."""
    key = hashlib.sha256((example / "requirements.txt").read_bytes() + sys.version.encode()).hexdigest()[:12]
    venv = CACHE / f"{example.name}-{key}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([_uv(), "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=300)
        subprocess.run(
            [_uv(), "pip", "install", "--quiet", "--python", str(python), "-r", str(example / "requirements.txt")],
            check=True,
            timeout=600,
        )
        (venv / ".complete").touch()
    return python


def _program(example: Path) -> Path:
    (program,) = [p for p in example.glob("*.py")]
    return program


def test_there_is_an_example_per_way_of_using_the_server():
    assert {e.name for e in EXAMPLES} >= {"openai_agents", "pydantic_ai", "langchain", "mcp_client", "http_client"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_each_example_says_how_to_run_it_and_how_to_go_real(example):
    doc = ast.get_docstring(ast.parse(_program(example).read_text()))
    assert doc and "pip install -r requirements.txt" in doc
    assert "--simulate" in doc and "PIAPI_API_KEY" in doc


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_the_example_runs_against_the_simulator_and_makes_an_image(example, tmp_path):
    python = example_python(example)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_", "OPENAI_", "VIRTUAL_ENV"))}
    env |= {
        "PIAPI_FLUX_MCP": str(Path(sys.executable).with_name("piapi-flux-mcp")),
        "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images"),
        "FLUX_MCP_DATA_DIR": str(tmp_path / "data"),
    }
    result = subprocess.run(
        [str(python), str(_program(example))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    images = sorted((tmp_path / "images").rglob("*.png"))
    assert images, result.stdout
    for image in images:
        with Image.open(image) as png:
            png.verify()
    assert any(str(image) in result.stdout for image in images)  # it tells the user where the image is
