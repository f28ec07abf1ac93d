"""The pure core, assembled, for the MCP server and the `generate` command alike.

- `backend(settings)`: PiAPI's base URL and key, or those of a built-in simulator started for the
  block (simulate mode).
- `build_service(...)`: the PiAPI client, ledger, image store and input resolver behind one
  `TaskService`. Imported and built on demand, so the server starts and lists its tools without
  loading the HTTP client or Pillow (the server builds it on a tool's first use).
- `open_service(settings)`: both, opened and closed together (the `generate` command).

A task made from the terminal therefore lands in the same ledger and output folder, under the
same rules, as one made by a tool call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from flux_mcp.settings import Settings

if TYPE_CHECKING:
    import httpx2
    from anyio.abc import TaskGroup

    from flux_mcp.lifecycle import TaskService
    from flux_mcp.polling import PollPolicy
    from flux_mcp.push import TaskEvents

log = logging.getLogger(__name__)


@asynccontextmanager
async def backend(settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """`(base_url, api_key)` of PiAPI, or of a simulator running for the block in simulate mode."""
    if not settings.simulate:
        yield settings.base_url, settings.require_api_key()
        return
    from flux_mcp.simulator import running_simulator

    async with running_simulator() as sim:
        log.warning("simulate mode: using the built-in PiAPI simulator at %s", sim.base_url)
        yield sim.base_url, sim.api_key


def build_service(
    settings: Settings,
    base_url: str,
    api_key: str,
    *,
    http: httpx2.AsyncClient | None = None,
    policy: PollPolicy | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    webhook: dict[str, str] | None = None,
    events: TaskEvents | None = None,
    background: TaskGroup | None = None,
) -> TaskService:
    """The core behind the tools: PiAPI client, ledger (opened on its first operation), image store.
    `policy` fixes the poll intervals (default: the learned schedule); `webhook` is our own receiver
    and `events` where its pushes arrive; `background` runs downloads that outlive their call
    (without it, a call waits for its downloads)."""
    from flux_mcp.client import PiAPIClient
    from flux_mcp.files import ImageStore, InputResolver
    from flux_mcp.ledger import TaskLedger
    from flux_mcp.lifecycle import TaskService

    client = PiAPIClient(
        base_url,
        api_key,
        http=http,
        timeout_seconds=settings.request_timeout_seconds,
        **({"sleep": sleep} if sleep else {}),
    )
    store = ImageStore(settings.images_dir, max_bytes=settings.max_download_bytes) if settings.save_images else None
    resolver = InputResolver(settings.allowed_image_roots(), max_bytes=settings.max_input_bytes)
    return TaskService(
        settings,
        client,
        TaskLedger(settings.ledger_path),  # opens (creates, migrates) the file on its first operation
        store=store,
        resolver=resolver,
        policy=policy,
        webhook=webhook,
        events=events,
        background=background,
        **({"sleep": sleep} if sleep else {}),
    )


async def close_service(service: TaskService) -> None:
    await service.client.aclose()
    await service.ledger.aclose()


@asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[TaskService]:
    async with backend(settings) as (base_url, api_key):
        service = build_service(settings, base_url, api_key)
        try:
            yield service
        finally:
            await close_service(service)
