"""Command line: `piapi-flux-mcp` (stdio server), `serve`, `demo`, `generate`, `gallery`, `simulator`.

Configuration errors are reported as one line on stderr with exit code 2, before any transport
opens. Logs always go to stderr: on stdio, stdout belongs to the protocol.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from flux_mcp.settings import ConfigurationError, Settings
from flux_mcp.startup import load_settings


def _configure_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx2", "httpcore2", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def _load_settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "simulate", False):
        overrides["simulate"] = True
    return load_settings(**overrides)


def _serve(args: argparse.Namespace) -> None:
    settings = _load_settings(args)
    _configure_logging(settings.log_level)
    if settings.public_url and args.transport != "http":
        logging.getLogger(__name__).warning("FLUX_MCP_PUBLIC_URL applies to --transport http only; polling instead")
    if args.transport == "http":
        if getattr(args, "workers", 1) > 1:
            from flux_mcp.workers import serve_workers

            serve_workers(settings, host=args.host, port=args.port, workers=args.workers)
            return
        from flux_mcp.http_app import serve_http

        serve_http(settings, host=args.host, port=args.port)
        return
    from flux_mcp.server import create_server

    create_server(settings).run()


def _demo(args: argparse.Namespace) -> None:
    import anyio

    from flux_mcp.demo import run_demo

    _configure_logging("WARNING")
    raise SystemExit(anyio.run(run_demo, args.output_dir))


def _simulator(args: argparse.Namespace) -> None:
    from flux_mcp.simulator import serve

    _configure_logging("INFO")
    serve(host=args.host, port=args.port, api_key=args.api_key)


def _gallery(args: argparse.Namespace) -> None:
    from flux_mcp.gallery.serve import serve_gallery

    settings = _load_settings(args)
    if args.data_dir:
        settings = settings.model_copy(update={"data_dir": Path(args.data_dir).expanduser().resolve()})
    _configure_logging(settings.log_level)
    serve_gallery(settings, port=args.port)


DESCRIPTION = (
    "MCP server for Flux image generation through PiAPI's task API. Run with no command, it serves MCP "
    "over stdio (what MCP hosts start); `serve --transport http` serves streamable HTTP instead."
)


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose epilog may be a function, called only when help is printed: the
    settings list and the exit codes cost imports that starting the server does not need."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _environment_help() -> str:
    from flux_mcp.settings_help import environment_help

    return environment_help()


def _exit_codes_help() -> str:
    from flux_mcp.generate import exit_codes_help

    return exit_codes_help()


def _add_front_door(parser: argparse.ArgumentParser) -> None:
    """`--version`, and every environment variable with its default in `--help` (from `Settings`)."""
    from flux_mcp import __version__

    parser.add_argument("--version", action="version", version=f"piapi-flux-mcp {__version__}")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _environment_help  # type: ignore[assignment]  # see _Parser


def _global_options() -> argparse.ArgumentParser:
    """Options that work anywhere on the command line, before or after the subcommand. Inside a
    subcommand they default to SUPPRESS, so a subcommand never resets what was given before it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--simulate", action="store_true", default=argparse.SUPPRESS, help="use the built-in PiAPI simulator (no key)"
    )
    return common


def _generate(args: argparse.Namespace) -> None:
    from flux_mcp import generate

    settings = _load_settings(args)
    if args.out:
        settings = settings.model_copy(update={"output_dir": Path(args.out).expanduser().resolve()})
    from flux_mcp.startup import check_folders

    check_folders(settings)
    _configure_logging(settings.log_level)
    try:
        arguments = dict(generate.parse_setting(item) for item in args.set)
    except generate.errors.InvalidInputError as exc:
        raise ConfigurationError(exc.message) from None
    given = {
        "prompt": args.prompt, "model": args.model, "image": args.image, "control_image": args.control_image,
        "width": args.width, "height": args.height, "batch_size": args.batch_size, "dry_run": args.dry_run or None,
    }  # fmt: skip
    arguments |= {name: value for name, value in given.items() if value is not None}
    raise SystemExit(
        generate.run(settings, args.task, arguments, wait_seconds=args.timeout, fresh=args.new, as_json=args.json)
    )


class _TaskTypes:
    """`generate --task`'s choices: the catalog's task types, read only when they are checked or shown."""

    def _values(self) -> list[str]:
        from flux_mcp.catalog import TaskType

        return [t.value for t in TaskType]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())

    def __contains__(self, value: object) -> bool:
        return value in self._values()


def _add_generate(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    gen = sub.add_parser(
        "generate",
        help="make an image from the terminal (progress on stderr, saved paths on stdout)",
        description="Submit one Flux task, show its progress, save the images and print their paths. "
        "Uses the same ledger and output folder as the MCP tools.",
        epilog=_exit_codes_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    gen.add_argument("prompt", help="what to draw")
    task = gen.add_argument("--task", default="txt2img", help="default txt2img")
    task.choices = _TaskTypes()  # set after add_argument, which would list them at once
    gen.add_argument("--model", help="e.g. Qubico/flux1-dev (tasks with one model choose it themselves)")
    gen.add_argument("--image", help="input image: a local file, URL or data: URI (img2img, fill, redux)")
    gen.add_argument("--control-image", help="control image for --task controlnet-lora")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--batch-size", type=int, help="1-4 images at once (schnell)")
    gen.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="any other argument of the task's tool, e.g. --set lora_type=anime --set denoise=0.6 (repeatable)",
    )  # fmt: skip
    gen.add_argument("--out", metavar="DIR", help="save images here (default: FLUX_MCP_OUTPUT_DIR)")
    gen.add_argument("--json", action="store_true", help="print the structured result as JSON on stdout")
    gen.add_argument("--new", action="store_true", help="submit again even if this same request was just made")
    gen.add_argument("--dry-run", action="store_true", help="print the PiAPI payload and price; send nothing")
    gen.add_argument("--timeout", type=float, default=600, help="seconds to wait before giving up (default 600)")
    gen.set_defaults(func=_generate)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = _Parser(prog="piapi-flux-mcp", description=DESCRIPTION, parents=[common])
    _add_front_door(parser)
    parser.set_defaults(func=_serve, transport="stdio", host="127.0.0.1", port=8000)
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the MCP server (default: stdio)", parents=[common])
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--workers", type=_positive, default=1, help="HTTP: server processes on the one port (default 1)"
    )
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="end-to-end demo: every task type against the simulator", parents=[common])
    demo.add_argument(
        "--output-dir", default="demo-output", help="each run writes its images and ledger to a new folder here"
    )
    demo.set_defaults(func=_demo)

    gallery = sub.add_parser(
        "gallery", help="browse every task and image in the ledger at http://127.0.0.1:PORT/", parents=[common]
    )
    gallery.add_argument("--port", type=int, default=8770, help="loopback port (0 = any free port; default 8770)")
    gallery.add_argument("--data-dir", help="the ledger's folder (default FLUX_MCP_DATA_DIR), e.g. demo-output/data")
    gallery.set_defaults(func=_gallery)

    _add_generate(sub, common)

    sim = sub.add_parser("simulator", help="run the PiAPI simulator as a standalone HTTP server", parents=[common])
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8089)
    sim.add_argument("--api-key", default="sim-key", help="the X-API-Key the simulator accepts")
    sim.set_defaults(func=_simulator)
    return parser


#: What `parse_args([])` gives: the bare command, as an MCP host starts it, serves stdio without
#: building the parser (every subcommand's options; tests/test_cli.py checks the two agree).
BARE_COMMAND = {"func": _serve, "transport": "stdio", "host": "127.0.0.1", "port": 8000, "command": None}


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argparse.Namespace(**BARE_COMMAND) if not argv else build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigurationError as exc:
        print(f"piapi-flux-mcp: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
