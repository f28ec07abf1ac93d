"""LangChain tools from piapi-flux-mcp (langchain-mcp-adapters), over stdio.

Runs as is with no key and no LLM: the server runs against its built-in simulator
(`--simulate`), and a scripted chat model (langchain-core's `GenericFakeChatModel`) produces the
tool call a real model would, which is run the way LangChain's agent loop runs it:
`tool.ainvoke(tool_call)` -> a `ToolMessage`.

    pip install -r requirements.txt    # its own venv: langchain-mcp-adapters needs mcp<2
    python agent.py

The server runs in its own environment (`uvx piapi-flux-mcp`, or `PIAPI_FLUX_MCP`), so the 1.x
SDK here talks to the 2.x server over the wire, which is the point of MCP.

To use a real model and real images: set `PIAPI_API_KEY`, drop `--simulate`, and give the tools
to an agent, e.g. `create_agent("openai:gpt-5", tools)` from `langchain`. LangChain turns the
result's `resource_link`s into image blocks with `flux://` URLs that a hosted model cannot fetch;
the text names the local paths, and the inline thumbnail carries the picture.
"""

from __future__ import annotations

import asyncio
import os
import shlex

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from langchain_mcp_adapters.client import MultiServerMCPClient

SERVER = shlex.split(os.environ.get("PIAPI_FLUX_MCP", "uvx piapi-flux-mcp"))
PROMPT = "a paper boat on a puddle, macro photo"


async def main() -> None:
    client = MultiServerMCPClient(
        {
            "flux": {
                "transport": "stdio",
                "command": SERVER[0],
                "args": [*SERVER[1:], "--simulate"],
                "env": dict(os.environ),  # PIAPI_API_KEY and FLUX_MCP_* settings reach the server
            }
        }
    )
    tools = {tool.name: tool for tool in await client.get_tools()}
    call = {"name": "flux_txt2img", "args": {"prompt": PROMPT, "width": 640, "height": 640}, "id": "call_1"}
    model = GenericFakeChatModel(messages=iter([AIMessage(content="", tool_calls=[call])]))
    reply = await model.ainvoke([HumanMessage(f"Draw {PROMPT}.")])
    for tool_call in reply.tool_calls:
        message = await tools[tool_call["name"]].ainvoke({**tool_call, "type": "tool_call"})
        blocks = message.content if isinstance(message.content, list) else [message.content]
        print(next(b if isinstance(b, str) else b.get("text") for b in blocks if isinstance(b, str) or b.get("text")))


if __name__ == "__main__":
    asyncio.run(main())
