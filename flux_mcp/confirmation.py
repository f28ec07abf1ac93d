"""Asking the user to confirm a paid call above `FLUX_MCP_CONFIRM_ABOVE_USD`, through elicitation.

A task tool carries a resolver parameter (`Annotated[ElicitationResult[SpendApproval],
Resolve(...)]`, the SDK's era-portable elicitation): on 2025 sessions the SDK sends a live
`elicitation/create` (form mode), on 2026-07-28 sessions it answers the call with an
`InputRequiredResult` and runs the tool when the client retries with the answer. The resolver
asks only when a *new* task above the threshold would be paid for: not for dry runs, re-attaches,
calls the budget refuses anyway, or arguments the tool will reject. A client that cannot answer
elicitation gets a refusal whose hint names the setting; nothing is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.resolve import AcceptedElicitation, Elicit
from mcp_types.version import is_version_at_least
from pydantic import BaseModel, Field

from flux_mcp.errors import ConfirmationRequiredError, FluxError, NotConfirmedError

if TYPE_CHECKING:
    from flux_mcp.catalog import TaskRequest
    from flux_mcp.lifecycle import TaskService


class SpendApproval(BaseModel):
    """The form the user sees: one checkbox."""

    confirm: bool = Field(description="Submit this paid task")


@dataclass(frozen=True)
class Unasked:
    """The resolver did not ask: either no confirmation is needed, or it could not be asked."""

    refusal: str | None = None


NOT_NEEDED = Unasked()


def client_can_confirm(ctx: Context[Any, Any]) -> bool:
    """Form elicitation declared by the client, and a way to deliver it on this request."""
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    if elicitation is None or (elicitation.form is None and elicitation.url is not None):
        return False
    version = ctx.protocol_version
    if version is not None and is_version_at_least(version, "2026-07-28"):
        return True  # asked inside the result (InputRequiredResult): no back channel needed
    return bool(ctx.session.can_send_request)  # a live elicitation/create needs a back channel


async def spend_question(
    ctx: Context[Any, Any], service: TaskService, tool: str, request: TaskRequest, idempotency_key: str | None
) -> Unasked | Elicit[SpendApproval]:
    guard = service.guard
    cost = request.estimated_cost_usd
    if guard.confirm_above_usd is None or cost <= guard.confirm_above_usd:
        return NOT_NEEDED
    if await service.would_reattach(tool, request, idempotency_key):
        return NOT_NEEDED  # re-attaching costs nothing
    if guard.decide(cost, await service.spent_today()) == "over_budget":
        return NOT_NEEDED  # the submission is refused by the budget anyway
    images = request.image_count
    what = f"{images} image{'s' if images != 1 else ''} with {request.model.value} ({request.task_type.value})"
    if not client_can_confirm(ctx):
        from flux_mcp.spend import usd  # loaded with the service (the ledger uses it), not at start

        return Unasked(
            refusal=f"this call costs {usd(cost)}, above the {usd(guard.confirm_above_usd)} per-call threshold "
            "(FLUX_MCP_CONFIRM_ABOVE_USD), and this client cannot ask the user to confirm"
        )
    return Elicit(guard.question(cost, what), SpendApproval)


def refusal(outcome: Any) -> FluxError | None:
    """The error to return instead of submitting, from the resolver's outcome; None = go ahead."""
    if outcome is None:
        return None
    if isinstance(outcome, AcceptedElicitation):
        data = outcome.data
        if isinstance(data, Unasked):
            return ConfirmationRequiredError(data.refusal) if data.refusal else None
        if isinstance(data, SpendApproval) and data.confirm:
            return None
        return NotConfirmedError("the user did not confirm the cost of this call")
    action = {"decline": "declined", "cancel": "cancelled"}.get(getattr(outcome, "action", ""), "declined")
    return NotConfirmedError(f"the user {action} the confirmation of this call's cost")
