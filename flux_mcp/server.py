"""The MCP server: `create_server(settings)` builds a `FluxServer` around the pure core.

`create_server` validates the settings (a missing key fails here, before any transport opens),
and its lifespan starts the backend (`runtime.backend`: PiAPI, or the simulator) and builds the
core (`runtime.build_service`) on a tool's first use, once per process (per connection in memory).
The tools themselves live in `flux_mcp.tools` (as `toolkit.FluxTool`s, built on the first tool
call; tools/list answers from their definitions as `flux_mcp.tool_list` keeps them), the Tasks
extension in `flux_mcp.tasks`. Only the SDK's public API is used: `FluxServer` overrides `list_tools`,
`call_tool` and `get_prompt` (tests/test_public_api.py checks that no `_`-prefixed SDK name is touched).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from mcp.types import Tool as MCPTool

from flux_mcp import __version__
from flux_mcp.gallery.apps import gallery_apps
from flux_mcp.runtime import backend, build_service, close_service
from flux_mcp.schemas import compact_output, show_configured_defaults, strip_titles
from flux_mcp.settings import Settings
from flux_mcp.startup import check_folders
from flux_mcp.tasks import TasksExtension
from flux_mcp.tool_list import tool_definitions
from flux_mcp.toolkit import FluxTool
from flux_mcp.tools import AppState, all_tools, register_app_tools, register_resources

if TYPE_CHECKING:
    import httpx2

    from flux_mcp.polling import PollPolicy
    from flux_mcp.relay import Relay
    from flux_mcp.webhooks import WebhookReceiver

log = logging.getLogger(__name__)

SERVER_VERSION = __version__

INSTRUCTIONS = (
    "Flux image generation through PiAPI. Each flux_* task tool submits one paid task and waits up to "
    "wait_seconds. If the result has status 'processing', call flux_wait_task with its task_id; never "
    "resubmit (a repeat of the same request re-attaches to the same task). Images are saved locally "
    "(images[].path) because PiAPI URLs expire; local paths are accepted as image inputs."
)


@dataclass
class ServerOptions:
    """Test seams: an HTTP client (e.g. over `httpx2.MockTransport`), fixed poll intervals instead of
    the learned schedule, and the polling clock; and the HTTP app's webhook receiver, if any, with
    the relay that carries its news to the other worker processes (`--workers`)."""

    http: httpx2.AsyncClient | None = None
    policy: PollPolicy | None = None
    receiver: WebhookReceiver | None = None
    relay: Relay | None = None
    sleep: Callable[[float], Awaitable[None]] | None = None


def _lifespan(settings: Settings, options: ServerOptions) -> Callable[[MCPServer], Any]:
    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[AppState]:
        async with AsyncExitStack() as stack:
            base_url, api_key = await stack.enter_async_context(backend(settings))
            # Downloads that outlive their call, and tasks finished by webhooks, run here for the
            # server's life.
            background = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(background.cancel_scope.cancel)  # runs first on the way out
            webhook = options.receiver.config if options.receiver is not None else None
            events = None
            if options.relay is not None:  # pushes reach the calls waiting in the other workers too
                from flux_mcp.push import TaskEvents

                events = TaskEvents()
                await stack.enter_async_context(options.relay.running(events))
            state = AppState(
                settings,
                lambda: build_service(
                    settings,
                    base_url,
                    api_key,
                    http=options.http,
                    policy=options.policy,
                    sleep=options.sleep,
                    webhook=webhook,
                    events=events,
                    background=background,
                ),
            )
            if options.receiver is not None:
                options.receiver.attach(state, background)

            async def close() -> None:  # the service exists only if a call used it (see AppState)
                if state.service_built:
                    await close_service(state.service)

            stack.push_async_callback(close)
            yield state

    return lifespan


class FluxServer(MCPServer):
    """`MCPServer` serving `FluxTool`s through the SDK's public overrides, on every path (wire or
    direct call):

    - tools/list shows the Flux tools in their fixed order, then any tool an extension added (with
      the same compact schemas).
    - A Flux tool receives the client's arguments untouched and validates them with its own
      model (`FluxTool.call`): the SDK would otherwise drop unknown names silently and
      JSON-decode text that looks like JSON (a prompt of `null`) before the model could report
      either.
    - An unknown tool is a JSON-RPC -32602 error, as both spec revisions require; `MCPServer`
      still answers it with an `isError` result (python-sdk#3659). The reference servers carry
      the same check; remove it once the SDK does this.
    - `prompts/get` is -32602 for an unknown prompt (this server has none); the SDK would answer
      an internal error.
    """

    def __init__(
        self, *args: Any, flux_tools: Callable[[], list[FluxTool]], listed: list[MCPTool], **kwargs: Any
    ) -> None:
        self._build_flux_tools = flux_tools
        self._listed = listed  # the same tools' definitions, as tools/list shows them
        super().__init__(*args, **kwargs)

    @functools.cached_property
    def flux_tools(self) -> dict[str, FluxTool]:
        return {tool.name: tool for tool in self._build_flux_tools()}

    async def list_tools(self) -> list[MCPTool]:
        contributed = [
            # Tools an extension registered (the gallery App's flux_rerun) get the same compact schemas.
            tool.model_copy(
                update={
                    "input_schema": strip_titles(copy.deepcopy(tool.input_schema)),
                    "output_schema": tool.output_schema and compact_output(tool.output_schema),
                }
            )
            for tool in await super().list_tools()
        ]
        return [*self._listed, *contributed]

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None) -> Any:
        tool = self.flux_tools.get(name)
        if tool is not None:
            return await tool.call(context or Context(mcp_server=self), arguments)
        if name not in {t.name for t in await super().list_tools()}:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {name}")
        return await super().call_tool(name, arguments, context)

    async def get_prompt(
        self, name: str, arguments: dict[str, Any] | None = None, context: Context[Any, Any] | None = None
    ) -> Any:
        if name not in {p.name for p in await self.list_prompts()}:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown prompt: {name}")
        return await super().get_prompt(name, arguments, context)


def _tool_definitions() -> list[dict[str, Any]]:
    """Every Flux tool's definition as the SDK serialises it (set fields only), before settings apply."""
    return [tool.definition().model_dump(mode="json", by_alias=True, exclude_unset=True) for tool in all_tools()]


def _listed_tools(settings: Settings) -> list[MCPTool]:
    """tools/list's Flux tools: the kept definitions, with descriptions stating this server's defaults."""
    listed = [MCPTool.model_validate(definition) for definition in tool_definitions(_tool_definitions)]
    for tool in listed:
        show_configured_defaults(tool.input_schema, settings)
    return listed


def create_server(settings: Settings | None = None, options: ServerOptions | None = None) -> MCPServer:
    """Build a fresh server. Raises `ConfigurationError` (one line) before any transport opens."""
    settings = settings or Settings()
    if not settings.simulate:
        settings.require_api_key()
    check_folders(settings)
    if settings.save_images:  # what downloads killed with their process left half-written
        from flux_mcp.files import sweep_partial_files

        sweep_partial_files(settings.images_dir)
    options = options or ServerOptions()
    apps = gallery_apps()
    register_app_tools(apps)
    tools = functools.cache(all_tools)  # the tool objects (and the catalog) on the first call
    mcp = FluxServer(
        "piapi-flux-mcp",
        title="Flux image generation (PiAPI)",
        version=SERVER_VERSION,
        instructions=INSTRUCTIONS,
        lifespan=_lifespan(settings, options),
        log_level=settings.log_level,
        subscriptions=False,
        flux_tools=tools,
        listed=_listed_tools(settings),
        extensions=[apps, TasksExtension(tools)],
    )
    register_resources(mcp)
    return mcp
