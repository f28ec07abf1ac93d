"""The local history page (`piapi-flux-mcp gallery`, `/gallery` on HTTP): its JSON API over the
ledger, images from the local copies only, loopback names only, and the HTTP transport's token."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import httpx2
import pytest
from conftest import GALLERY_PROMPTS
from PIL import Image
from pydantic import SecretStr

from flux_mcp.gallery import view_html
from flux_mcp.gallery.page import gallery_app

pytestmark = pytest.mark.anyio


def http(app, host="127.0.0.1:8770") -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=f"http://{host}")


async def test_the_page_is_the_shared_view_and_loads_nothing_from_elsewhere(settings):
    async with http(gallery_app(settings)) as client:
        page = await client.get("/")
    assert page.status_code == 200 and page.text == view_html("page")
    assert '<meta name="flux-gallery-mode" content="page">' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no external scripts, styles or images


async def test_tasks_come_newest_first_with_filters_and_prompt_search(settings, seeded_ledger):
    async with http(gallery_app(settings)) as client:
        everything = (await client.get("/api/tasks")).json()
        prompts = [t["request"]["prompt"] for t in everything["tasks"]]
        assert prompts == [GALLERY_PROMPTS["running"], GALLERY_PROMPTS["failed"], GALLERY_PROMPTS["batch"]]
        assert everything["total"] == 3 and everything["facets"]["task_type"] == ["txt2img"]
        assert set(everything["facets"]["model"]) == {"Qubico/flux1-schnell", "Qubico/flux1-dev"}
        assert everything["spent_today_usd"] > 0

        async def prompts_for(**query):
            found = (await client.get("/api/tasks", params=query)).json()["tasks"]
            return [t["request"]["prompt"] for t in found]

        assert await prompts_for(status="failed") == [GALLERY_PROMPTS["failed"]]
        assert await prompts_for(model="Qubico/flux1-dev") == [GALLERY_PROMPTS["running"]]
        assert await prompts_for(q="LIGHTHOUSE") == [GALLERY_PROMPTS["batch"]]
        assert await prompts_for(q="%") == [] and await prompts_for(q="_") == []  # LIKE wildcards are literal
        assert await prompts_for(until="1") == [] and len(await prompts_for(since="1")) == 3
        assert len(await prompts_for(limit="1", offset="1")) == 1


async def test_a_task_opens_with_its_request_history_and_local_images(settings, seeded_ledger):
    async with http(gallery_app(settings)) as client:
        listed = (await client.get("/api/tasks", params={"q": "lighthouses"})).json()["tasks"][0]
        task = (await client.get(f"/api/tasks/{listed['local_id']}")).json()
        assert task["task_id"] == seeded_ledger["batch"]["task_id"] and task["request"]["batch_size"] == 4
        assert [h["status"] for h in task["history"]][-1] == "completed"
        assert len(task["images"]) == 4 and all(i["path"] for i in task["images"])
        image = await client.get(f"/images/{listed['local_id']}/3")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert image.content[:8] == b"\x89PNG\r\n\x1a\n"
        thumbnail = await client.get(f"/thumbnails/{listed['local_id']}/3")
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] in ("image/webp", "image/jpeg")
        assert (
            max(Image.open(io.BytesIO(thumbnail.content)).size) <= 512 < max(Image.open(io.BytesIO(image.content)).size)
        )
        assert (await client.get(f"/images/{listed['local_id']}/4")).status_code == 404
        assert (await client.get(f"/thumbnails/{listed['local_id']}/4")).status_code == 404
        assert (await client.get("/images/not-a-task/0")).status_code == 404
        assert (await client.get("/api/tasks/not-a-task")).status_code == 404


async def test_only_loopback_names_are_answered(settings):
    async with http(gallery_app(settings), host="attacker.example") as client:
        assert (await client.get("/")).status_code == 400


async def test_on_the_http_transport_the_gallery_needs_the_same_token(settings, seeded_ledger):
    from flux_mcp.http_app import build_http_app

    app = build_http_app(settings.model_copy(update={"auth_token": SecretStr("s3cret-token")}))
    async with http(app) as client:
        assert (await client.get("/gallery/")).status_code == 401
        assert (await client.get("/gallery/api/tasks")).status_code == 401
        assert (await client.get("/gallery/?token=wrong")).status_code == 401
        authorised = await client.get("/gallery/api/tasks", headers={"Authorization": "Bearer s3cret-token"})
        assert authorised.status_code == 200 and authorised.json()["total"] == 3
        opened = await client.get("/gallery/?token=s3cret-token")
        assert opened.status_code == 303 and opened.headers["location"] == "/gallery/"
        cookie = opened.headers["set-cookie"]
        assert "s3cret-token" not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        page = await client.get("/gallery/")  # the client keeps the cookie
        assert page.status_code == 200 and "flux-gallery-mode" in page.text
    async with http(build_http_app(settings)) as client:  # loopback without a token: open, like /mcp
        assert (await client.get("/gallery")).headers["location"] == "/gallery/"
        assert (await client.get("/gallery/api/tasks")).status_code == 200


@pytest.mark.slow
def test_the_gallery_command_prints_its_url_and_serves_it(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux_mcp", "gallery", "--port", "0", "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        assert httpx2.get(url + "api/tasks", timeout=10).json()["total"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_serve_http_prints_the_history_page_url(tmp_path):
    import os
    import time

    token = "a-long-enough-test-token-1234"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIAPI_", "FLUX_MCP_"))}
    env |= {"FLUX_MCP_DATA_DIR": str(tmp_path / "data"), "FLUX_MCP_OUTPUT_DIR": str(tmp_path / "images")}
    env |= {"FLUX_MCP_AUTH_TOKEN": token}
    argv = [sys.executable, "-m", "flux_mcp", "--simulate", "serve", "--transport", "http", "--port", "0"]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, seen = time.monotonic() + 20, []
        while not any(b"history page" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen.append(proc.stderr.readline())
        url = re.search(rb"history page (\S+)", b"".join(seen)).group(1).decode()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/gallery/", url)
        for _ in range(200):  # printed once the socket listens; the app may still be starting
            try:
                answer = httpx2.get(url + "api/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=10)
                break
            except httpx2.TransportError:
                time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["total"] == 0
        assert httpx2.get(url, timeout=10).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stderr.close()
