"""piapi-flux-mcp: an MCP server for Flux image generation through PiAPI's task API.

Layout, in the order a request flows: `catalog` (what PiAPI accepts) -> `parameters` (the flat
tool arguments) -> `client` (HTTP to PiAPI) -> `polling` and `lifecycle` (submit once, wait,
ledger, local copies) -> `results`, `tools` and `server` (the MCP surface) -> `cli`. `simulator/` is a
second implementation of PiAPI's HTTP contract, used by the demo and the tests.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("piapi-flux-mcp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0"
