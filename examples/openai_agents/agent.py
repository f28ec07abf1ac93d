"""An OpenAI Agents SDK agent that makes an image with piapi-flux-mcp, over stdio.

Runs as is with no key and no LLM: the server runs against its built-in simulator
(`--simulate`), and `ScriptedModel` stands in for the model, asking for one `flux_txt2img` call
and then answering with what the tool returned, so the real `Agent`, `Runner` and
`MCPServerStdio` do the real work: tool discovery, the call over stdio, the result.

    pip install -r requirements.txt
    python agent.py

To use a real model and real images: set `OPENAI_API_KEY` and `PIAPI_API_KEY`, drop
`ScriptedModel()` (the agent then uses the SDK's default OpenAI model) and `--simulate`.

`client_session_timeout_seconds` matters: the SDK's default (5 s) is shorter than an image
generation, so the call would be abandoned (and the server would cancel the task at PiAPI).
60 s covers the server's 45 s default wait; a task still running then comes back as
`processing` with a task id for `flux_wait_task`.

`PIAPI_FLUX_MCP` overrides the command that starts the server (default `uvx piapi-flux-mcp`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex

from agents import Agent, Runner, set_tracing_disabled
from agents.items import ModelResponse
from agents.mcp import MCPServerStdio
from agents.models.interface import Model
from agents.usage import Usage
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText

SERVER = shlex.split(os.environ.get("PIAPI_FLUX_MCP", "uvx piapi-flux-mcp"))
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


class ScriptedModel(Model):
    """Plays the model's part: one tool call, then a reply quoting the tool's text result."""

    async def get_response(self, system_instructions, input, model_settings, tools, *args, **kwargs):
        results = [item for item in input if isinstance(item, dict) and item.get("type") == "function_call_output"]
        if not results:
            assert "flux_txt2img" in {tool.name for tool in tools}
            call = ResponseFunctionToolCall(
                type="function_call",
                call_id="call_1",
                name="flux_txt2img",
                arguments=json.dumps({"prompt": PROMPT, "width": 768, "height": 512}),
            )
            return ModelResponse(output=[call], usage=Usage(), response_id=None)
        output = results[-1]["output"]  # the tool's content blocks: summary text, thumbnail, resource links
        summary = output if isinstance(output, str) else next(i["text"] for i in output if i["type"] == "input_text")
        text = ResponseOutputText(type="output_text", text=summary, annotations=[])
        message = ResponseOutputMessage(
            type="message", id="msg_1", role="assistant", status="completed", content=[text]
        )
        return ModelResponse(output=[message], usage=Usage(), response_id=None)

    def stream_response(self, *args, **kwargs):
        raise NotImplementedError


async def main() -> None:
    set_tracing_disabled(True)  # no trace export without an OpenAI key
    params = {
        "command": SERVER[0],
        "args": [*SERVER[1:], "--simulate"],
        "env": dict(os.environ),  # PIAPI_API_KEY and FLUX_MCP_* settings reach the server
    }
    async with MCPServerStdio(params=params, client_session_timeout_seconds=60, cache_tools_list=True) as server:
        agent = Agent(
            name="Illustrator",
            instructions="Make the image the user asks for with the flux tools, then say where it was saved.",
            mcp_servers=[server],
            model=ScriptedModel(),
        )
        result = await Runner.run(agent, f"Draw {PROMPT}.")
    print(result.final_output)


if __name__ == "__main__":
    asyncio.run(main())
