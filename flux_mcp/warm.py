"""A long-running HTTP server process, made ready before it serves.

`serve --transport http` (and each `--workers` process) calls `ready_to_serve()` once, before it
accepts a connection:
- It loads now what a first tool call would load on demand (the HTTP client and its connection
  pool, the certificate store, the ledger, image handling). The stdio server keeps loading these
  lazily: there, start-up time is what an MCP host waits for; here, a first caller should not pay
  for it.
- It tells the garbage collector that everything alive at that point lives as long as the process
  (`gc.freeze`): modules, classes and functions are never scanned again.
- A full collection comes after 100 middle-generation ones instead of 10. The objects of a
  thousand calls in flight are many, and short-lived: each full collection scanned all of them.
  (A Python whose collector is incremental ignores this third threshold, and keeps the first two
  as they were read.)

Measured with `python bench/scale.py -n 1000`, the collector timed through `gc.callbacks`: 9 full
collections took 1.9 s of the server's CPU, the longest a 0.5 s pause for every call in flight;
with both, over three runs, 2 or 3 took 0.08-0.47 s, the longest pause of any collection 58-386 ms.
"""

from __future__ import annotations

import gc
import importlib

# What a first tool call loads (tests/test_warm.py checks a call loads nothing more).
FIRST_CALL_MODULES = (
    "flux_mcp.runtime",
    "flux_mcp.client",
    "flux_mcp.transport",
    "flux_mcp.lifecycle",
    "flux_mcp.ledger",
    "flux_mcp.files",
    "aiohttp",
    "yarl",
    "httpcore2",  # httpx2's certificate store
    "PIL.Image",
    "PIL.ImageOps",
    "PIL.features",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "PIL.WebPImagePlugin",
)


FULL_COLLECTION_AFTER = 100  # middle-generation collections (Python's default: 10)


def ready_to_serve() -> None:
    for name in FIRST_CALL_MODULES:
        importlib.import_module(name)
    from flux_mcp.transport import tls_context

    tls_context()  # the certificate store, loaded before the first call rather than during it
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)
