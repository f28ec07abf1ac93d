"""How long from starting the server process to an answered `tools/list`, against a bare server?

Starts each command as a stdio subprocess, writes `initialize`, `notifications/initialized` and
`tools/list` at once (as a client that has the process ready to talk to would), and times from
`Popen` to the `tools/list` answer on stdout. The two servers run alternately, N times each,
with the same Python, so machine noise hits both alike; the median of each and the ratio are
printed. Beside the wall time each server's CPU time (user + system, from the kernel's
accounting of the child) is printed too: on a busy machine the wall time moves with everyone
else's work, the CPU time much less.

- `piapi-flux-mcp`: `python -m flux_mcp` with a key set (the normal configuration; nothing is
  sent to PiAPI for tools/list) and its data and output directories in a temporary folder.
- `one-tool MCPServer`: the same SDK's `MCPServer` with a single tool, nothing else.

    python bench/cold_start.py [--runs 10] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python -m flux_mcp` imports the package from the working directory first: run it in this
# checkout, so the bench measures the code beside it wherever it is started from.
ROOT = Path(__file__).resolve().parent.parent

BARE_SERVER = """
from mcp.server import MCPServer

mcp = MCPServer("bare")


@mcp.tool()
def echo(text: str) -> str:
    \"\"\"Echo the text back.\"\"\"
    return text


mcp.run()
"""

MESSAGES = [
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "cold-start-bench", "version": "1"},
        },
    },
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
]


def time_to_tools_list(argv: list[str], env: dict[str, str]) -> tuple[float, int, float | None]:
    """Seconds from process start to the tools/list answer, how many tools it listed, and the CPU
    seconds the process used until it was stopped right after (None where the OS cannot say)."""
    payload = "".join(json.dumps(m) + "\n" for m in MESSAGES).encode()
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(payload)
        proc.stdin.flush()
        for line in proc.stdout:
            message = json.loads(line)
            if message.get("id") == 2:
                elapsed = time.perf_counter() - start
                proc.kill()
                return elapsed, len(message["result"]["tools"]), _cpu_seconds(proc)
        raise RuntimeError(f"{argv} exited before answering tools/list")
    finally:
        proc.kill()
        proc.wait()


def _cpu_seconds(proc: subprocess.Popen) -> float | None:
    if not hasattr(os, "wait4"):
        return None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each server (default 10)")
    parser.add_argument("--quick", action="store_true", help="5 runs of each")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs

    with tempfile.TemporaryDirectory() as tmp:
        bare = Path(tmp) / "bare_server.py"
        bare.write_text(BARE_SERVER)
        # Bytecode caching on (an installed wheel has its .pyc files), whatever this shell says.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FLUX_MCP_", "PIAPI_")) and k != "PYTHONDONTWRITEBYTECODE"
        }
        env.update(
            PIAPI_API_KEY="cold-start-bench",
            FLUX_MCP_DATA_DIR=str(Path(tmp) / "data"),
            FLUX_MCP_OUTPUT_DIR=str(Path(tmp) / "images"),
        )
        servers = {
            "piapi-flux-mcp": [sys.executable, "-m", "flux_mcp"],
            "one-tool MCPServer": [sys.executable, str(bare)],
        }
        times: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        tools: dict[str, int] = {}
        for argv in servers.values():  # one untimed warm-up each (disk cache, .pyc files)
            time_to_tools_list(argv, env)
        for _ in range(runs):
            for name, argv in servers.items():
                elapsed, tools[name], used = time_to_tools_list(argv, env)
                times[name].append(elapsed)
                if used is not None:
                    cpu[name].append(used)

    print(f"process start -> tools/list answered, stdio, median of {runs} (python {sys.version.split()[0]})")
    print(f"{'server':<22} {'tools':>5} {'median':>8} {'min':>8} {'max':>8} {'CPU median':>11}")
    for name, values in times.items():
        used = f"{statistics.median(cpu[name]) * 1000:>8.0f} ms" if cpu[name] else f"{'-':>11}"
        print(
            f"{name:<22} {tools[name]:>5} {statistics.median(values) * 1000:>6.0f} ms "
            f"{min(values) * 1000:>5.0f} ms {max(values) * 1000:>5.0f} ms {used}"
        )
    ours, bare = "piapi-flux-mcp", "one-tool MCPServer"
    ratio = statistics.median(times[ours]) / statistics.median(times[bare])
    print(f"ratio piapi-flux-mcp / one-tool MCPServer: {ratio:.2f}x")
    if cpu[ours] and cpu[bare]:
        print(f"CPU time ratio: {statistics.median(cpu[ours]) / statistics.median(cpu[bare]):.2f}x")


if __name__ == "__main__":
    main()
