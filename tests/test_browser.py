"""The gallery in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright).

- The history page over a seeded ledger (a finished batch of 4, a failed task, a running one):
  images rendered from the local copies, filters and search, each task's detail.
- The App view inside a small host page that speaks the MCP Apps bridge (ui/initialize, tool
  input, tool result, tools/call and resources/read from the view), forwarding the view's requests
  to the real server through an MCP client, under the CSP the host builds from the resource's own
  declaration: images rendered, live status through flux_get_task, actions calling the right tools.

No console errors anywhere. Screenshots are kept under test-artifacts/test_browser/ (listed at the
end of the run). Run with `python3 dev.py browser`; with CI=true a missing browser is a failure,
elsewhere the group is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest
from conftest import GALLERY_PROMPTS
from mcp import Client

from flux_mcp.gallery.apps import VIEW_URI
from flux_mcp.gallery.page import gallery_app
from flux_mcp.simulator.server import running_app

pytestmark = [pytest.mark.anyio, pytest.mark.browser]

CHROMIUM = os.environ.get("FLUX_MCP_CHROMIUM", "/usr/bin/chromium")
# The machine's network is closed: no background traffic, no updates, no first-run work.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
async def browser(tmp_path):
    """A fresh Chromium (its own --user-data-dir) and a list collecting console errors."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[ci]')")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1100, "height": 820},
        )
        errors: list[str] = []
        context.on("weberror", lambda error: errors.append(str(error.error)))
        try:
            yield context, errors
        finally:
            await context.close()


async def new_page(browser):
    context, errors = browser
    page = await context.new_page()
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return page


async def rendered_widths(frame, selector: str, count: int = 1) -> list[int]:
    """naturalWidth of every image matching `selector`, once at least `count` are there and loaded."""
    await frame.wait_for_function(
        "([s, n]) => { const all = [...document.querySelectorAll(s)]; "
        "return all.length >= n && all.every(i => i.complete); }",
        arg=[selector, count],
    )
    return await frame.eval_on_selector_all(selector, "images => images.map(i => i.naturalWidth)")


# --- the history page ------------------------------------------------------------------------------


async def test_history_page_shows_the_ledger_with_images_filters_and_details(
    browser, settings, seeded_ledger, artifact_dir
):
    page = await new_page(browser)
    async with running_app(gallery_app(settings)) as url:
        await page.goto(url + "/")
        await page.wait_for_selector(".card")
        cards = page.locator(".card")
        assert await cards.count() == 3
        assert await cards.first.locator(".prompt").inner_text() == GALLERY_PROMPTS["running"]  # newest first
        assert all(w > 0 for w in await rendered_widths(page, ".card img"))  # the one finished task's cover
        await page.screenshot(path=artifact_dir / "history.png", full_page=True)

        await page.fill("input[name=q]", "lighthouse")
        await page.wait_for_function("() => document.querySelectorAll('.card').length === 1")
        await page.fill("input[name=q]", "")
        await page.wait_for_function("() => document.querySelectorAll('.card').length === 3")
        await page.select_option("select[name=status]", "failed")
        await page.wait_for_function("() => document.querySelectorAll('.card').length === 1")
        assert await page.locator(".card .prompt").inner_text() == GALLERY_PROMPTS["failed"]
        await page.select_option("select[name=status]", "")
        await page.wait_for_function("() => document.querySelectorAll('.card').length === 3")

        await page.click(f".card[data-task-id='{seeded_ledger['batch']['task_id']}']")
        await page.wait_for_selector(".detail .images figure")
        assert await page.locator(".detail .images figure").count() == 4
        widths = await rendered_widths(page, ".detail .images img", 4)
        assert len(widths) == 4 and all(w > 0 for w in widths)
        assert GALLERY_PROMPTS["batch"] in await page.locator(".detail .quote").inner_text()
        assert "batch_size" in await page.locator(".detail table").first.inner_text()
        await page.screenshot(path=artifact_dir / "history-batch-of-4.png", full_page=True)
        assert all(w <= 512 for w in widths)  # thumbnails; full size on click
        await page.click(".detail .images .thumb")
        assert (await rendered_widths(page, ".lightbox img"))[0] == 1024
        await page.click(".lightbox")

        await page.click("[data-action=back]")
        await page.click(f".card[data-task-id='{seeded_ledger['failed']['task_id']}']")
        await page.wait_for_selector(".detail .error")
        assert "nsfw content detected" in await page.locator(".detail .error").inner_text()
        await page.screenshot(path=artifact_dir / "history-failed.png", full_page=True)

        await page.click("[data-action=back]")
        await page.click(f".card[data-task-id='{seeded_ledger['running']['task_id']}']")
        await page.wait_for_selector(".detail .running")
        await page.screenshot(path=artifact_dir / "history-running.png", full_page=True)
    assert browser[1] == []


# --- the App view inside a host ----------------------------------------------------------------------

HOST_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Apps host</title>
<style>body{margin:0;font:13px system-ui;background:#ddd} header{padding:6px 10px}
iframe{border:0;width:100%;height:760px;background:#fff}</style>
</head><body><header>test host: MCP Apps bridge</header><iframe id="view" sandbox="allow-scripts"></iframe>
<script>
  const frame = document.getElementById("view");
  window.calls = [];
  function reply(id, result) { frame.contentWindow.postMessage({ jsonrpc: "2.0", id, result }, "*"); }
  function notify(method, params) { frame.contentWindow.postMessage({ jsonrpc: "2.0", method, params }, "*"); }
  window.addEventListener("message", async (event) => {
    if (event.source !== frame.contentWindow) return;
    const msg = event.data;
    window.calls.push({ method: msg.method, params: msg.params });
    if (msg.method === "ui/initialize") {
      reply(msg.id, { protocolVersion: "2026-01-26", hostInfo: { name: "test-host", version: "1" },
                      hostCapabilities: { serverTools: {}, serverResources: {} }, hostContext: { theme: "light" } });
    } else if (msg.method === "ui/notifications/initialized") {
      notify("ui/notifications/tool-input", { arguments: window.toolInput });
      notify("ui/notifications/tool-result", window.toolResult);
    } else if (msg.method === "tools/call" || msg.method === "resources/read") {
      const answer = await window.mcpRequest(msg.method, msg.params);
      if (answer.error) frame.contentWindow.postMessage({ jsonrpc: "2.0", id: msg.id, error: answer.error }, "*");
      else reply(msg.id, answer.result);
    }
  });
  window.showView = (html, csp, toolInput, toolResult) => {
    window.toolInput = toolInput;
    window.toolResult = toolResult;
    const policy = '<meta http-equiv="Content-Security-Policy" content="' + csp + '">';
    frame.srcdoc = html.replace("<head>", "<head>" + policy);
  };
</script></body></html>"""


def wire(model: Any) -> dict[str, Any]:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def host_csp(declared: dict[str, list[str]]) -> str:
    """The CSP a host builds from a view's `_meta.ui.csp` (the Apps spec's defaults plus what it declares)."""
    images = " ".join(["data:", *declared.get("resourceDomains", [])])
    connect = " ".join(declared.get("connectDomains", [])) or "'none'"
    return (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        f"img-src {images}; media-src {images}; connect-src {connect}"
    )


class AppsHost:
    """Drives the host page: shows a tool result in the view, answers the view's requests through
    a real MCP client, and records what the view asked for."""

    def __init__(self, page, client: Client) -> None:
        self.page = page
        self.client = client

    async def start(self) -> None:
        async def mcp_request(method: str, params: dict[str, Any]) -> dict[str, Any]:
            try:
                if method == "tools/call":
                    result = await self.client.call_tool(params["name"], params.get("arguments") or {})
                else:
                    result = await self.client.read_resource(params["uri"])
            except Exception as exc:  # the view must see a JSON-RPC error, not a hang
                return {"error": {"code": -32603, "message": str(exc)}}
            return {"result": wire(result)}

        await self.page.expose_function("mcpRequest", mcp_request)
        await self.page.set_content(HOST_PAGE)
        view = (await self.client.read_resource(VIEW_URI)).contents[0]
        self.html, self.csp = view.text, host_csp(view.meta["ui"]["csp"])

    async def show(self, tool_input: dict[str, Any], result) -> None:
        await self.page.evaluate("() => { window.calls = []; }")
        await self.page.evaluate(
            "([html, csp, input, result]) => window.showView(html, csp, input, result)",
            [self.html, self.csp, tool_input, wire(result)],
        )
        await self.page.wait_for_function("() => window.calls.some(c => c.method === 'ui/notifications/initialized')")

    async def calls(self, method: str | None = None) -> list[dict[str, Any]]:
        calls = await self.page.evaluate("() => window.calls")
        return [c for c in calls if method is None or c["method"] == method]

    async def tool_calls(self) -> list[tuple[str, dict[str, Any]]]:
        return [(c["params"]["name"], c["params"].get("arguments") or {}) for c in await self.calls("tools/call")]

    def view(self):
        return self.page.frames[1]


async def test_the_app_view_in_a_host_shows_results_and_calls_the_right_tools(browser, server, sim, artifact_dir):
    page = await new_page(browser)
    async with Client(server) as client:
        host = AppsHost(page, client)
        await host.start()

        # A finished batch of 4: thumbnails read through resources/read, full size on click.
        batch_args = {"prompt": GALLERY_PROMPTS["batch"], "batch_size": 4}
        batch = await client.call_tool("flux_txt2img", batch_args)
        task_id = batch.structured_content["task_id"]
        await host.show(batch_args, batch)
        view = host.view()
        await view.wait_for_selector(".detail .images figure")
        widths = await rendered_widths(view, ".detail .images img", 4)
        assert len(widths) == 4 and all(w > 0 for w in widths)
        assert GALLERY_PROMPTS["batch"] in await view.locator(".detail .quote").inner_text()
        reads = [c["params"]["uri"] for c in await host.calls("resources/read")]
        assert f"flux://tasks/{task_id}" in reads
        assert {f"flux://tasks/{task_id}/thumbnails/{n}" for n in range(4)} <= set(reads)
        await page.screenshot(path=artifact_dir / "app-batch-of-4.png", full_page=True)
        await view.click(".detail .images .thumb")  # full size: the image itself, through its resource
        assert (await rendered_widths(view, ".lightbox img"))[0] == 1024
        assert f"flux://tasks/{task_id}/images/0" in [c["params"]["uri"] for c in await host.calls("resources/read")]
        await view.click(".lightbox")
        await view.click("[data-action=copy-path]")
        assert batch.structured_content["images"][0]["path"] in await view.locator(".toast").inner_text()

        # Re-run: the app-only tool, with the task id; the view then follows the new task.
        await view.click("[data-action=rerun]")
        await page.wait_for_function("() => window.calls.some(c => c.params && c.params.name === 'flux_rerun')")
        assert ("flux_rerun", {"task_id": task_id}) in await host.tool_calls()
        await view.wait_for_function(f"() => document.querySelector('.detail').dataset.taskId !== '{task_id}'")

        # A running task: live status through flux_get_task, and a cancel through flux_cancel_task.
        sim.state.configure(durations={"Qubico/flux1-dev": 600})
        run_args = {"prompt": GALLERY_PROMPTS["running"], "model": "Qubico/flux1-dev", "wait_seconds": 0}
        running = await client.call_tool("flux_txt2img", run_args)
        running_id = running.structured_content["task_id"]
        await host.show(run_args, running)
        view = host.view()
        await view.wait_for_selector(".detail .running")
        await page.wait_for_function(
            "() => window.calls.some(c => c.params && c.params.name === 'flux_get_task')", timeout=10_000
        )
        assert ("flux_get_task", {"task_id": running_id}) in await host.tool_calls()
        await page.screenshot(path=artifact_dir / "app-running.png", full_page=True)
        await view.click("[data-action=cancel]")
        await page.wait_for_function("() => window.calls.some(c => c.params && c.params.name === 'flux_cancel_task')")
        assert ("flux_cancel_task", {"task_id": running_id}) in await host.tool_calls()

        # A task that finishes while shown: the view follows it to its images.
        sim.state.configure(durations={"Qubico/flux1-dev": 2.5})
        soon = await client.call_tool("flux_txt2img", {**run_args, "prompt": "done in a moment"})
        assert soon.structured_content["status"] in ("pending", "processing")
        await host.show({**run_args, "prompt": "done in a moment"}, soon)
        view = host.view()
        await view.wait_for_selector(".detail[data-status=completed] .images img", timeout=20_000)
        assert (await rendered_widths(view, ".detail .images img"))[0] > 0

        # A failed task: the error, no images, no polling.
        sim.state.add_fault("fail_next", code=10001, message="nsfw content detected")
        failed = await client.call_tool("flux_txt2img", {"prompt": GALLERY_PROMPTS["failed"]})
        await host.show({"prompt": GALLERY_PROMPTS["failed"]}, failed)
        view = host.view()
        await view.wait_for_selector(".detail .error")
        assert "nsfw content detected" in await view.locator(".detail .error").inner_text()
        await page.screenshot(path=artifact_dir / "app-failed.png", full_page=True)

        # flux_list_tasks: the tasks as cards; opening one fetches it with flux_get_task.
        listed = await client.call_tool("flux_list_tasks", {})
        await host.show({}, listed)
        view = host.view()
        await view.wait_for_selector(".card")
        assert await view.locator(".card").count() == len(listed.structured_content["tasks"])
        await view.click(f".card[data-task-id='{task_id}']")
        await view.wait_for_selector(".detail .images img")
        assert ("flux_get_task", {"task_id": task_id}) in await host.tool_calls()
        await page.screenshot(path=artifact_dir / "app-list.png", full_page=True)
    assert browser[1] == [], json.dumps(browser[1])
