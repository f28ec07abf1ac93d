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
- A young collection comes after 50,000 net allocations instead of 700. A call allocates
  thousands of objects that die within milliseconds; collected every 700, the ones still alive
  were scanned again and again and promoted, and each middle collection then scanned them all.
  (A Python whose collector is incremental ignores the third threshold; a young threshold larger
  than ours is kept.)

Measured with `python bench/scale.py -n 1000`, the collector timed through `gc.callbacks`: 9 full
collections took 1.9 s of the server's CPU, the longest a 0.5 s pause for every call in flight;
with both, over three runs, 2 or 3 took 0.08-0.47 s, the longest pause of any collection 58-386 ms.
With the young threshold too, the server's young and middle collections went from about 1,350
and 120 (0.8-0.9 s) to about 240 and 22 (0.6-0.9 s), no full collection came during the load,
and CPU per call fell 1-2 ms in 3 of 4 alternating pairs.
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
YOUNG_COLLECTION_AFTER = 50_000  # net allocations (Python's default: 700; 2,000 from 3.13)


def ready_to_serve() -> None:
    for name in FIRST_CALL_MODULES:
        importlib.import_module(name)
    from PIL import Image

    Image.preinit()  # the format drivers opening an image held in memory loads (a preview made while saving)
    from flux_mcp.transport import tls_context

    tls_context()  # the certificate store, loaded before the first call rather than during it
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_COLLECTION_AFTER), middle, FULL_COLLECTION_AFTER)
