"""`piapi-flux-mcp generate`: a person's command. Run as a subprocess against a standalone
simulator, piped and under a pseudo-terminal, as people and scripts would run it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import anyio
import pytest
from PIL import Image

from flux_mcp.cli import main
from flux_mcp.errors import ErrorCategory
from flux_mcp.generate import EXIT_CODES, EXIT_INTERRUPTED, EXIT_STILL_RUNNING, Progress
from flux_mcp.record import TaskRecord

pytestmark = pytest.mark.slow


def _env(sim, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_"))}
    return (
        base
        | sim.env()
        | {"FLUX_MCP_DATA_DIR": str(tmp_path / "data"), "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images")}
    )


def generate(sim, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The command run in this process (no interpreter start-up per call): its environment, working
    directory and standard streams are swapped in for the call."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_env(sim, tmp_path))
    try:
        with contextlib.chdir(tmp_path), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["generate", *args])
    except SystemExit as exc:
        code = exc.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["generate", *args], code, out.getvalue(), err.getvalue())


def generate_in_a_subprocess(sim, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flux_mcp", "generate", *args],
        env=_env(sim, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def under_a_terminal(sim, tmp_path: Path, *args: str, interrupt_when: bytes | None = None) -> tuple[int, str, bytes]:
    """Run with stderr on a pseudo-terminal (stdout piped); returns (exit code, stdout, terminal bytes).
    With `interrupt_when`, send SIGINT (what Ctrl-C does) once that text has appeared."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_mcp", "generate", *args],
        env=_env(sim, tmp_path),
        cwd=tmp_path,
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    screen, deadline, interrupted = b"", time.monotonic() + 60, False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
        if interrupt_when and not interrupted and interrupt_when in screen:
            proc.send_signal(signal.SIGINT)
            interrupted = True
    os.close(leader)
    code = proc.wait(timeout=30)
    return code, proc.stdout.read().decode(), screen


def _png(path: str, size: tuple[int, int]) -> None:
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == size


def test_piped_it_prints_plain_status_lines_and_the_saved_paths(standalone_simulator, tmp_path):
    result = generate_in_a_subprocess(
        standalone_simulator, tmp_path, "a red fox", "--model", "Qubico/flux1-dev", "--width", "512"
    )
    assert result.returncode == 0, result.stderr
    (path,) = result.stdout.splitlines()
    assert Path(path).parent == tmp_path / "images"
    _png(path, (512, 1024))
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    task_id = Path(path).stem.rsplit("_", 1)[0]
    lines = result.stderr.splitlines()
    assert lines[0] == f"task {task_id}: queued (0.1 s)" or lines[0].startswith(f"task {task_id}: queued (")
    assert lines[-1].startswith("completed in ") and task_id in lines[-1]


def test_a_terminal_gets_a_redrawn_progress_bar_with_status_and_elapsed_time(standalone_simulator, tmp_path):
    code, stdout, screen = under_a_terminal(
        standalone_simulator, tmp_path, "a blue whale", "--model", "Qubico/flux1-dev", "--out", str(tmp_path / "o")
    )
    assert code == 0, screen
    (path,) = stdout.splitlines()
    assert Path(path).parent == tmp_path / "o"
    frames = screen.decode().split("\r\x1b[2K")
    bars = [f for f in frames if " s [" in f and "]" in f]
    assert len(bars) >= 5  # redrawn in place, several times a second
    assert any(f.split()[1] == "queued" for f in bars)
    elapsed = [float(f.split()[2]) for f in bars]
    assert elapsed == sorted(elapsed) and elapsed[-1] > elapsed[0]  # the clock runs between polls
    assert len({f.split("[")[1].split("]")[0] for f in bars}) > 1  # the bar moves
    assert all("task " in f for f in bars)


def test_the_status_line_names_each_phase():
    stream = io.StringIO()
    progress = Progress(stream, live=True)
    for status, word in [("pending", "queued"), ("processing", "processing"), ("completed", "saving")]:
        anyio.run(progress.update, TaskRecord(task_id="t-1", model="m", task_type="txt2img", status=status), 1.0)
        frame = stream.getvalue().rsplit("\r\x1b[2K", 1)[-1]
        assert frame.split()[1] == word and "task t-1" in frame


def test_a_repeat_reattaches_through_the_same_ledger_and_new_submits_again(standalone_simulator, tmp_path):
    first = generate(standalone_simulator, tmp_path, "a lighthouse")
    again = generate(standalone_simulator, tmp_path, "a lighthouse")
    assert first.returncode == again.returncode == 0
    assert again.stdout == first.stdout and "re-attaching instead of paying again" in again.stderr
    fresh = generate(standalone_simulator, tmp_path, "a lighthouse", "--new")
    assert fresh.returncode == 0 and fresh.stdout != first.stdout
    assert len(standalone_simulator.tasks()) == 2


def test_json_prints_the_tools_structured_result(standalone_simulator, tmp_path):
    result = generate(standalone_simulator, tmp_path, "two cats", "--batch-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["status"] == "completed" and body["task_type"] == "txt2img" and body["error"] is None
    assert len(body["images"]) == 2 and all(Path(i["path"]).is_file() for i in body["images"])


def test_an_input_image_named_on_the_command_line_is_read(standalone_simulator, tmp_path):
    elsewhere = tmp_path / "photos"
    elsewhere.mkdir()
    Image.new("RGB", (320, 240), (10, 120, 200)).save(elsewhere / "in.png")
    work = tmp_path / "work"  # the working directory is not the photo's folder
    work.mkdir()
    result = generate(
        standalone_simulator, work, "as an oil painting", "--task", "img2img",
        "--image", str(elsewhere / "in.png"), "--set", "denoise=0.6",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (path,) = result.stdout.splitlines()
    assert Path(path).is_file()


@pytest.mark.parametrize(
    ("args", "category"),
    [
        (["--width", "2048"], "invalid_input"),
        (["--set", "lora_type=nope", "--task", "txt2img-lora"], "invalid_input"),
    ],
)
def test_bad_arguments_exit_2_and_send_nothing(standalone_simulator, tmp_path, args, category):
    result = generate(standalone_simulator, tmp_path, "a cat", *args)
    assert result.returncode == EXIT_CODES[category] == 2
    assert f"error [{category}]" in result.stderr and result.stdout == ""
    assert standalone_simulator.tasks() == []


def test_exit_codes_name_the_failure_kind(standalone_simulator, tmp_path):
    standalone_simulator.fault("fail_next", message="NSFW content detected")
    failed = generate(standalone_simulator, tmp_path, "a cat", "--json")
    assert failed.returncode == EXIT_CODES["task_failed"] == 1
    assert json.loads(failed.stdout)["error"]["message"] == "NSFW content detected"

    env_key = _env(standalone_simulator, tmp_path) | {"PIAPI_API_KEY": "wrong"}
    auth = subprocess.run(
        [sys.executable, "-m", "flux_mcp", "generate", "a cat"], env=env_key, capture_output=True, text=True, timeout=60
    )
    assert auth.returncode == EXIT_CODES["auth"] == 3 and "error [auth]" in auth.stderr

    standalone_simulator.configure(durations={"dev-advanced": 30})
    slow = generate(standalone_simulator, tmp_path, "slow", "--task", "redux-variation", "--image", "https://x.test/a.png",
                    "--timeout", "0.5")  # fmt: skip
    assert slow.returncode == EXIT_STILL_RUNNING and "still" in slow.stderr and "flux_wait_task" in slow.stderr

    missing = subprocess.run(
        [sys.executable, "-m", "flux_mcp", "generate", "a cat"],
        env={k: v for k, v in _env(standalone_simulator, tmp_path).items() if k != "PIAPI_API_KEY"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "PIAPI_API_KEY is not set" in missing.stderr


def test_ctrl_c_cancels_the_task_at_piapi(standalone_simulator, tmp_path):
    standalone_simulator.configure(pending_seconds=30)  # PiAPI cancels only pending tasks
    code, stdout, screen = under_a_terminal(standalone_simulator, tmp_path, "a cat", interrupt_when=b"queued")
    assert code == EXIT_INTERRUPTED, screen
    assert b"asking PiAPI to cancel task" in screen and stdout == ""
    (task,) = standalone_simulator.tasks()
    assert task["status"] == "cancelled"


def test_simulate_needs_no_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_"))}
    result = subprocess.run(
        [sys.executable, "-m", "flux_mcp", "generate", "a cat", "--simulate", "--out", str(tmp_path)],
        env=env | {"FLUX_MCP_DATA_DIR": str(tmp_path / "data")},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _png(result.stdout.strip(), (1024, 1024))


def test_every_error_category_has_its_exit_code():
    assert set(get_args(ErrorCategory)) <= set(EXIT_CODES)


def test_help_documents_every_exit_code():
    result = subprocess.run([sys.executable, "-m", "flux_mcp", "generate", "--help"], capture_output=True, text=True)
    for code in {*EXIT_CODES.values(), EXIT_STILL_RUNNING, EXIT_INTERRUPTED}:
        assert f"\n  {code:>3}  " in result.stdout
