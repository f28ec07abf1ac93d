"""The generic tool layer: a tool is an arguments model, a result type and a body. No tool names here.

Every tool of this server is a `FluxTool`. Its `arguments` model is both what tools/list publishes
(titles stripped) and what validates the client's raw arguments, so every bad or unknown argument
comes back as one structured `invalid_input` error, untouched by any lenient parsing on the way
(text that looks like JSON stays text). Its `result` type (`results.ToolResult`) is the published
`outputSchema` and decides how a failure is shown. A tool body raises `FluxError` for anticipated
failures; `FluxTool.call` turns that into the tool's own error result. A tool may ask the user
first through the SDK's resolvers (`needs`: parameters marked `Resolve(...)`, e.g. a spend
confirmation by elicitation, which works in both protocol eras). A task tool also has a `start`
that submits without waiting, which the Tasks extension uses (`flux_mcp.tasks`).

`server.FluxServer` lists and calls these through the SDK's public `list_tools`/`call_tool`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import build_resolver_plans, find_resolved_parameters, resolve_arguments
from mcp.types import CallToolResult, InputRequiredResult, ToolAnnotations
from mcp.types import Tool as MCPTool
from pydantic import BaseModel

from flux_mcp.errors import FluxError
from flux_mcp.record import TaskRecord
from flux_mcp.results import ToolResult
from flux_mcp.schemas import strip_titles

#: What a task tool's `start` gives back: the task it submitted (or re-attached to), or a finished
#: result when there is nothing to wait for (a dry run).
Started = TaskRecord | CallToolResult


async def _no_context(ctx: Context, raw: Mapping[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class FluxTool:
    name: str
    title: str
    description: str
    arguments: type[BaseModel]
    result: type[ToolResult]
    #: The body: `run(ctx, arguments, **resolved)`, where `resolved` holds what `needs` asked for.
    run: Callable[..., Awaitable[CallToolResult]]
    annotations: ToolAnnotations
    #: Fields of an error result beyond the error (a task tool's task type, model, today's spend).
    error_context: Callable[[Context, Mapping[str, Any]], Awaitable[dict[str, Any]]] = _no_context
    #: A function whose parameters are `Annotated[..., Resolve(resolver)]`: run before the body,
    #: with the validated arguments available to resolvers as `arguments`.
    needs: Callable[..., Any] | None = None
    #: Task tools: `start(ctx, arguments, **resolved)` submits and returns at once.
    start: Callable[..., Awaitable[Started]] | None = None
    meta: dict[str, Any] | None = field(default=None)

    @cached_property
    def input_schema(self) -> dict[str, Any]:
        return strip_titles(self.arguments.model_json_schema())

    def definition(self) -> MCPTool:
        return MCPTool(
            name=self.name,
            title=self.title,
            description=self.description,
            input_schema=self.input_schema,
            output_schema=self.result.output_schema(),
            annotations=self.annotations,
            _meta=self.meta,
        )

    def validate(self, raw: Any) -> dict[str, Any]:
        from flux_mcp.parameters import validate_arguments  # the catalog loads on a tool's first use

        return validate_arguments(self.arguments, raw)

    async def call(self, ctx: Context, raw: Any) -> CallToolResult | InputRequiredResult:
        return await self._invoke(self.run, ctx, raw)

    async def begin(self, ctx: Context, raw: Any) -> Started | InputRequiredResult:
        """A task tool's call without the wait (see `flux_mcp.tasks`)."""
        assert self.start is not None
        return await self._invoke(self.start, ctx, raw)

    async def _invoke(self, body: Callable[..., Awaitable[Any]], ctx: Context, raw: Any) -> Any:
        try:
            arguments = self.validate(raw)
            resolved = await self._resolve(ctx, arguments)
            if isinstance(resolved, InputRequiredResult):
                return resolved  # the client answers (2026-07-28 era) and calls again
            return await body(ctx, arguments, **resolved)
        except FluxError as exc:
            context = await self.error_context(ctx, raw if isinstance(raw, Mapping) else {})
            return self.result.failure(exc, **context)

    async def _resolve(self, ctx: Context, arguments: dict[str, Any]) -> dict[str, Any] | InputRequiredResult:
        if self.needs is None:
            return {}
        params, plans = self._resolver_plans
        return await resolve_arguments(params, plans, {"arguments": dict(arguments)}, ctx)

    @cached_property
    def _resolver_plans(self) -> tuple[Any, Any]:
        """How `needs`' parameters are resolved: worked out once (it reads type hints), not per call."""
        params = find_resolved_parameters(self.needs)
        return params, build_resolver_plans(params, {"arguments"})
