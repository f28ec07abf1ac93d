"""The fresh-clone front door: `python3 dev.py demo` and `python3 dev.py test`.

Each command does its own set-up: it creates `.venv` beside this file when missing (or when
`pyproject.toml` changed since the last install), installs the project with its test extra into
it, then runs the demo or the tests inside it. Only Python 3.11+ is needed; `.ci/run` uses the same
commands, so what CI checks is what the README tells a new user to type.

    python3 dev.py demo          # the whole product against the built-in simulator
    python3 dev.py test [ARGS]   # the core test suite, one process per core (extra arguments go to pytest)
    python3 dev.py lint          # ruff check and ruff format --check
    python3 dev.py examples      # every program in examples/, each in its own venv (slower)
    python3 dev.py wheel         # build wheel + sdist; run the wheel with uvx under the MCP Inspector CLI
    python3 dev.py browser       # the gallery page and App view in headless Chromium (needs `chromium`)

`VENV=/some/dir` puts the environment elsewhere (CI uses a throwaway one).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("VENV") or ROOT / ".venv")
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".piapi-flux-mcp-installed"
# The slower groups, kept out of `test` by pyproject's addopts and run by `.ci/run` after it; they
# also need the `ci` extra (uv, which builds the wheel and the examples' own venvs).
GROUPS = {"examples": "examples", "wheel": "wheel", "browser": "browser"}


def _install_fingerprint(extras: str) -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()


def ensure_venv(extras: str = "test") -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py is the one file run by any python3
        raise SystemExit(f"piapi-flux-mcp needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() in {_install_fingerprint(extras), _install_fingerprint("test,ci")}:
        return
    print("dev.py: installing the project and its test tools (once)", file=sys.stderr)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[{extras}]"], check=True)
    STAMP.write_text(_install_fingerprint(extras))


def run(argv: list[str]) -> int:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(argv, cwd=ROOT, env=env).returncode


def _workers(pytest_args: list[str]) -> list[str]:
    """The core suite on one process per core, up to 4 (pytest-xdist), unless the arguments say
    how many (`-n 0`: this one), ask for `--pdb`, or turn the plugin off (`-p no:xdist`)."""
    if any(a.startswith(("-n", "--numprocesses", "--pdb", "no:xdist")) for a in pytest_args):
        return []
    cores = min(os.cpu_count() or 1, 4)
    return ["-n", str(cores)] if cores > 1 else []


def main(args: list[str]) -> int:
    command, rest = (args[0], args[1:]) if args else ("", [])
    if command not in {"demo", "test", "lint", *GROUPS}:
        print(__doc__.strip().split("\n\n")[2], file=sys.stderr)
        return 2
    ensure_venv("test,ci" if command in GROUPS else "test")
    if command == "demo":
        return run([str(PYTHON), "-m", "flux_mcp", "demo", *rest])
    if command == "test":
        return run([str(PYTHON), "-m", "pytest", "-q", *_workers(rest), *rest])
    if command in GROUPS:
        return run([str(PYTHON), "-m", "pytest", "-q", "-m", GROUPS[command], *rest])
    ruff = [str(PYTHON), "-m", "ruff"]
    return run([*ruff, "check", "."]) or run([*ruff, "format", "--check", "."])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
