"""Fuzzing every tool's arguments over MCP against the simulator: an invalid argument set never
creates a task and is always refused as a structured `invalid_input` error naming a bad field.

Each example picks a tool, a set of its arguments to break, and for every argument either a valid
value (or nothing, when optional) or a broken one: the wrong JSON type (`true` for an integer,
`"512"` or `" 512 "` for a number, `0` or `"off"` for a boolean, null where only a real value is
accepted), out of range, or a URL without a host. Valid sets are dry runs, so no example may ever
POST to the simulator.
"""

from __future__ import annotations

import anyio.from_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from flux_mcp import catalog as c
from flux_mcp.parameters import REQUIRED, TASK_TOOLS

MISSING = object()  # a required argument left out
_any_junk = st.one_of(
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
_not_int = st.one_of(
    st.booleans(),
    st.integers(-5, 2000).map(str),
    st.integers(1, 1024).map(lambda n: f"  {n} "),
    st.integers(1, 1024).map(float),
    st.floats(0.5, 1000.5).filter(lambda x: x != int(x)),
    st.none(),
    _any_junk,
)
_not_float = st.one_of(st.booleans(), st.floats(0.1, 5).map(str), st.just(" 1.0 "), _any_junk)
_not_bool = st.one_of(
    st.sampled_from(["off", "no", "false", "true", "0", "1", ""]), st.integers(0, 1), st.none(), _any_junk
)
_not_str = st.one_of(st.integers(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), _any_junk)
_bad_urls = st.sampled_from(
    ["http:///path", "https://", "ftp://host/x.png", "hooks.example/x", "http://host:99999/x", "http:// h/x", "//h/x"]
)
_text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip())


def _choice(values) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    return st.sampled_from(list(values)), st.one_of(_text.filter(lambda s: s not in values), _not_str)


def _number(lo: float, hi: float, *, integer: bool, below: float, above: float):
    valid = st.integers(int(lo), int(hi)) if integer else st.floats(lo, hi)
    bad = st.one_of(_not_int if integer else _not_float, st.just(below), st.just(above))
    return valid, bad


# name -> (valid values, invalid values); "optional" below adds null / "" / absent as valid.
ARGUMENTS: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    "prompt": (_text, st.one_of(_not_str, st.sampled_from(["", "   "]), st.none())),
    "model": _choice([m.value for m in c.Model]),
    "negative_prompt": (st.text(max_size=20), _not_str),
    "width": _number(64, 1024, integer=True, below=0, above=-8),
    "height": _number(64, 1024, integer=True, below=0, above=-1),
    "guidance_scale": _number(1.5, 5, integer=False, below=1.4, above=5.1),
    "batch_size": _number(1, 1, integer=True, below=0, above=5),
    "denoise": _number(0.05, 1, integer=False, below=0, above=1.5),
    "image": (st.just("https://images.example/in.png"), st.one_of(_bad_urls, st.just("/etc/passwd"), _not_str)),
    "control_image": (st.just("https://images.example/c.png"), st.one_of(_bad_urls, _not_str)),
    "lora_type": _choice(c.LORA_TYPES),
    "lora_strength": _number(0.1, 2, integer=False, below=0, above=2.5),
    "control_type": _choice(c.CONTROL_TYPES),
    "control_strength": _number(0.1, 1, integer=False, below=0, above=1.5),
    "return_preprocessed_image": (st.booleans(), _not_bool),
    **{
        f"outpaint_{side}": _number(0, 512, integer=True, below=-1, above=c.MAX_PIXELS + 1)
        for side in ("left", "right", "top", "bottom")
    },
    "wait_seconds": _number(0, 1, integer=False, below=-1, above=601),
    "dry_run": (st.just(True), _not_bool),  # valid sets never pay
    "idempotency_key": (_text, _not_str),
    "include_image": _choice(["thumbnail", "none"]),
    "task_id": (st.just("0a1b2c3d-0000-4000-8000-000000000000"), st.one_of(_not_str, st.just("../../x"), st.none())),
    "status": _choice(["pending", "processing", "completed", "failed", "cancelled", "uncertain", "lost"]),
    "task_type": _choice([t.value for t in c.TaskType]),
    "limit": _number(1, 200, integer=True, below=0, above=201),
}

# tool -> {argument: required?}
TOOLS: dict[str, dict[str, bool]] = {
    **{t.name: {p.name: p.default is REQUIRED for p in t.all_parameters()} for t in TASK_TOOLS},
    "flux_get_task": {"task_id": True},
    "flux_wait_task": {"task_id": True, "wait_seconds": False},
    "flux_cancel_task": {"task_id": True},
    "flux_list_tasks": {"status": False, "task_type": False, "limit": False},
}
# Arguments that accept null / "" as "not given" (their default is "not given").
OPTIONAL = {p.name for t in TASK_TOOLS for p in t.all_parameters() if p.default is None} | {
    "wait_seconds",
    "status",
    "task_type",
}


@st.composite
def calls(draw):
    tool = draw(st.sampled_from(sorted(TOOLS)))
    params = TOOLS[tool]
    names = sorted(params)
    bad = set(draw(st.sets(st.sampled_from(names), max_size=3)))
    args = {}
    for name in names:
        valid, invalid = ARGUMENTS[name]
        if name in bad:
            value = draw(st.one_of(invalid, st.just(MISSING)) if params[name] else invalid)
        elif params[name] or name == "dry_run":
            value = draw(valid)
        else:
            nothing = st.sampled_from([MISSING, None, ""] if name in OPTIONAL else [MISSING])
            value = draw(st.one_of(nothing, valid))
        if value is not MISSING:
            args[name] = value
    if tool in {t.name for t in TASK_TOOLS} and "dry_run" not in bad:
        args["dry_run"] = True
    return tool, args, bad


def test_no_invalid_argument_set_creates_a_task_and_every_refusal_names_a_field(tmp_path):
    from flux_mcp.polling import BackoffPolicy
    from flux_mcp.server import ServerOptions, create_server
    from flux_mcp.settings import Settings
    from flux_mcp.simulator import running_simulator

    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        with portal.wrap_async_context_manager(running_simulator()) as sim:
            (tmp_path / "work").mkdir()
            config = Settings(
                api_key=sim.api_key,
                base_url=sim.base_url,
                data_dir=tmp_path / "data",
                output_dir=tmp_path / "images",
                image_roots=[tmp_path / "work"],
                wait_seconds=0,
                request_timeout_seconds=5,
            )
            options = ServerOptions(policy=BackoffPolicy(first=(0.01, 0.01), factor=1.5, cap=0.05))
            with portal.wrap_async_context_manager(Client(create_server(config, options))) as client:

                @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
                @given(calls())
                def check(call):
                    tool, args, bad = call
                    result = portal.call(client.call_tool, tool, args)
                    assert not [e for e in sim.state.log if e["method"] == "POST"], (tool, args)
                    body = result.structured_content or {}
                    if bad:
                        error = body.get("error") or {}
                        assert result.is_error and error.get("category") == "invalid_input", (tool, args, body)
                        assert any(name in error["message"] for name in bad), (tool, args, bad, error["message"])

                check()
