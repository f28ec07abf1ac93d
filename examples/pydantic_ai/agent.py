"""A pydantic-ai agent that makes an image with piapi-flux-mcp, over stdio.

Runs as is with no key and no LLM: the server runs against its built-in simulator
(`--simulate`), and pydantic-ai's own `FunctionModel` plays the model, asking for one
`flux_txt2img` call and then answering with the tool's result, so a real `Agent` with a real
`MCPToolset` does the tool discovery, the call over stdio and the result handling.

    pip install -r requirements.txt
    python agent.py

To use a real model and real images: set `PIAPI_API_KEY` and your model provider's key, drop
`--simulate`, and pass a model name instead of the FunctionModel, e.g.
`Agent("openai:gpt-5", toolsets=[toolset])`.

`PIAPI_FLUX_MCP` overrides the command that starts the server (default `uvx piapi-flux-mcp`).
"""

from __future__ import annotations

import asyncio
import os
import shlex

from fastmcp.client.transports import StdioTransport
from pydantic_ai import Agent
from pydantic_ai.mcp import MCPToolset
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

SERVER = shlex.split(os.environ.get("PIAPI_FLUX_MCP", "uvx piapi-flux-mcp"))
PROMPT = "a red fox in fresh snow, watercolour"


def scripted_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """First turn: call flux_txt2img. Second turn: report what the tool returned."""
    returns = [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]
    if not returns:
        assert "flux_txt2img" in {tool.name for tool in info.function_tools}
        return ModelResponse(parts=[ToolCallPart("flux_txt2img", {"prompt": PROMPT, "width": 512, "height": 512})])
    return ModelResponse(parts=[TextPart(f"Done: {returns[-1].model_response_str()}")])


async def main() -> None:
    transport = StdioTransport(
        command=SERVER[0],
        args=[*SERVER[1:], "--simulate"],
        env=dict(os.environ),  # PIAPI_API_KEY and FLUX_MCP_* settings reach the server
    )
    toolset = MCPToolset(transport, tool_error_behavior="error")
    agent = Agent(FunctionModel(scripted_model), toolsets=[toolset])
    async with agent:
        result = await agent.run(f"Draw {PROMPT}.")
    print(result.output)


if __name__ == "__main__":
    asyncio.run(main())
