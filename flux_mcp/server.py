"""The MCP server: `create_server(settings)` builds a `FluxServer` around the pure core.

`create_server` validates the settings (a missing key fails here, before any transport opens),
and its lifespan starts the backend (`runtime.backend`: PiAPI, or the simulator) and builds the
core (`runtime.build_service`) on a tool's first use, once per process (per connection in memory).
The tools themselves live in `flux_mcp.tools`.

Two things lean on SDK internals, each in one place with its reason: `_publish_schemas` (titles
and output `$ref`s) and `FluxServer` (call checks), both through the SDK's registries
(`_tool_manager`, `_prompt_manager`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from pydantic import ValidationError

from flux_mcp import __version__
from flux_mcp.catalog import describe_validation_error
from flux_mcp.errors import InvalidInputError
from flux_mcp.gallery.apps import gallery_apps
from flux_mcp.parameters import TASK_TOOLS
from flux_mcp.runtime import backend, build_service, close_service
from flux_mcp.schemas import compact_output, strip_titles
from flux_mcp.settings import Settings
from flux_mcp.startup import check_folders
from flux_mcp.tools import TASK_TOOL_NAMES, AppState, failure_result, list_failure, register_app_tools, register_tools

if TYPE_CHECKING:
    import httpx

    from flux_mcp.polling import PollPolicy
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
    """Test seams: an HTTP client (e.g. over `httpx.MockTransport`), fixed poll intervals instead of
    the learned schedule, and the polling clock; and the HTTP app's webhook receiver, if any."""

    http: httpx.AsyncClient | None = None
    policy: PollPolicy | None = None
    receiver: WebhookReceiver | None = None
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
    """`MCPServer` with the call checks this server needs, on every path (wire or direct call):

    - An unknown tool is a JSON-RPC -32602 error, as both spec revisions require; `MCPServer`
      still answers it with an `isError` result (python-sdk#3659). The reference servers carry
      the same check; remove it once the SDK does this.
    - A task tool receives the client's arguments untouched, as one `raw_arguments` value: the
      SDK would otherwise drop unknown names silently and JSON-decode text that looks like JSON
      (a prompt of `null`) before the tool's own model could report either.
    - The other tools keep the SDK's validation, reported as the same `invalid_input` error; an
      argument they do not have is -32602.
    - `prompts/get` is -32602 for an unknown prompt (this server has none); the SDK would answer
      an internal error.
    """

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None) -> Any:
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool: {name}")
        if name in TASK_TOOL_NAMES:
            return await super().call_tool(name, {"raw_arguments": arguments}, context)
        if unknown := sorted(set(arguments) - set(tool.parameters.get("properties", {}))):
            raise MCPError(code=INVALID_PARAMS, message=f"{name} has no argument(s): {', '.join(unknown)}")
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                raise
            # The same structured invalid_input error as the task tools give.
            error = InvalidInputError(describe_validation_error(exc.__cause__))
            if name == "flux_list_tasks":
                return list_failure(error)
            return failure_result(error, cancel=name == "flux_cancel_task")

    async def get_prompt(
        self, name: str, arguments: dict[str, Any] | None = None, context: Context[Any, Any] | None = None
    ) -> Any:
        if self._prompt_manager.get_prompt(name) is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown prompt: {name}")
        return await super().get_prompt(name, arguments, context)


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
    mcp = FluxServer(
        "piapi-flux-mcp",
        title="Flux image generation (PiAPI)",
        version=SERVER_VERSION,
        instructions=INSTRUCTIONS,
        lifespan=_lifespan(settings, options),
        log_level=settings.log_level,
        subscriptions=False,
        extensions=[apps],
    )
    register_tools(mcp)
    _publish_schemas(mcp)
    return mcp


def _publish_schemas(mcp: MCPServer) -> None:
    # Task tools publish their strict argument model (their signatures are lenient, see
    # `_task_tool_function`). Pydantic adds a `title` to every property after any per-field hook
    # has run, and output models arrive behind `$ref`s named by the SDK's generator, so schemas
    # are compacted here, once, on the registered tools (the SDK reads `fn_metadata.output_schema`
    # live). `_tool_manager` is the SDK's registry; tests/test_server_protocol.py measures tools/list.
    strict = {t.name: t.arguments_model.model_json_schema() for t in TASK_TOOLS}
    for tool in mcp._tool_manager.list_tools():
        if tool.name in strict:
            tool.parameters = strict[tool.name]
        strip_titles(tool.parameters)
        if tool.fn_metadata.output_schema is not None:
            tool.fn_metadata.output_schema = compact_output(tool.fn_metadata.output_schema)
