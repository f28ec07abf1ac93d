"""The Flux tools' definitions as tools/list publishes them, kept between starts.

Building them means building every task tool's arguments model from the catalog and generating
each tool's JSON schemas with pydantic: most of what a server start cost beyond the SDK's own
import. The definitions are a pure function of this package's source code and of the Python,
pydantic and SDK versions, so they are kept in a file named by a hash of exactly those, beside
the package's bytecode (`flux_mcp/__pycache__/tool-list.<hash>.json`): a change to any of them
names another file, so a kept list can never be out of date. Where that folder cannot be
written (or Python is told not to write bytecode) the list is simply computed at each start.

The definitions are stored as the SDK's `Tool` serialises them with only the fields that were set,
so reading one back gives the same `Tool` the code would have built. Settings are applied after
(`schemas.show_configured_defaults`), never stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pydantic
import pydantic_core

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
CACHE_DIR = PACKAGE_DIR / "__pycache__"
_PREFIX = "tool-list."

Definitions = list[dict[str, Any]]


def source_key() -> str:
    """A hash of every Python source file of this package and the versions its output depends on."""
    digest = hashlib.sha256()
    for text in (sys.version, pydantic.VERSION, pydantic_core.__version__, version("mcp")):
        digest.update(text.encode() + b"\0")
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]


def cache_path() -> Path:
    return CACHE_DIR / f"{_PREFIX}{source_key()}.json"


def tool_definitions(compute: Callable[[], Definitions]) -> Definitions:
    """The kept definitions for this exact source, else `compute()`'s (then kept for next time)."""
    path = cache_path()
    with contextlib.suppress(OSError, ValueError):
        definitions = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(definitions, list):
            return definitions
    definitions = compute()
    if not sys.dont_write_bytecode:
        _keep(path, definitions)
    return definitions


def _keep(path: Path, definitions: Definitions) -> None:
    """Write atomically (another process may be starting too) and drop lists of other sources."""
    temp = None
    try:
        path.parent.mkdir(exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{_PREFIX}", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(definitions, file, ensure_ascii=False, separators=(",", ":"))
        os.chmod(temp, 0o644)  # readable by every user of this installation, as its bytecode is
        os.replace(temp, path)
    except OSError as exc:
        log.debug("tool list not kept in %s: %s", path.parent, exc)
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        return
    for old in path.parent.glob(f"{_PREFIX}*.json"):
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
