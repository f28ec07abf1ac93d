"""Offline PiAPI simulator: a second implementation of PiAPI's Flux task API for tests and demos.

It speaks the same HTTP contract as `https://api.piapi.ai` (create / get / cancel a task, the
`{code, data, message}` envelope, PiAPI's task object, temporary image URLs) but renders
placeholder PNGs locally, runs on a clock tests can control, and can be told to misbehave
(HTTP errors, malformed bodies, failed tasks, late or slow responses, expired files, dropped or
duplicated webhooks), either in-process through `SimulatorState` or over HTTP through the
`/_simulator/...` admin routes. Tasks queue and run for times drawn per model (seedable), and
webhooks are delivered in PiAPI's format.
"""

from flux_mcp.simulator.app import DEFAULT_API_KEY, create_app
from flux_mcp.simulator.render import output_size, render_png
from flux_mcp.simulator.server import RunningSimulator, bind_socket, running_app, running_simulator, serve
from flux_mcp.simulator.state import (
    DEFAULT_DURATIONS,
    PIAPI_LIKE_PROFILES,
    Fault,
    LogEntry,
    ManualClock,
    SimTask,
    SimulatorConfig,
    SimulatorState,
    TimingProfile,
)

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_DURATIONS",
    "PIAPI_LIKE_PROFILES",
    "Fault",
    "LogEntry",
    "ManualClock",
    "RunningSimulator",
    "SimTask",
    "SimulatorConfig",
    "SimulatorState",
    "TimingProfile",
    "bind_socket",
    "create_app",
    "output_size",
    "render_png",
    "running_app",
    "running_simulator",
    "serve",
]
