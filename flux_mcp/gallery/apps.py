"""The gallery as an MCP App: the shared view served as a `ui://` resource, for the tools that carry
`VIEW_META` (the task tools, `flux_get_task`, `flux_wait_task`, `flux_list_tasks`) and the app-only
`flux_rerun` (registered by `flux_mcp.tools.register_app_tools`).

Inside a host that supports Apps the view gets the tool's result over the Apps bridge, reads the
task record and the images through `resources/read` (`flux://tasks/...`, local copies, shown as
`data:` URLs), polls `flux_get_task` while a task runs, and calls `flux_rerun` / `flux_cancel_task`.
It loads nothing from any other origin, so its CSP declares no domains at all. Hosts without Apps
ignore the `_meta` and get exactly the same results as before.
"""

from __future__ import annotations

from mcp.server.apps import Apps, ResourceCsp

from flux_mcp.gallery import view_html

VIEW_URI = "ui://piapi-flux-mcp/gallery.html"
VIEW_META = {"ui": {"resourceUri": VIEW_URI}}


def gallery_apps() -> Apps:
    apps = Apps()
    apps.add_html_resource(
        VIEW_URI,
        view_html("app"),
        name="flux_gallery",
        title="Flux gallery",
        description="The images, prompt, parameters and live status of Flux tasks.",
        csp=ResourceCsp(connect_domains=[], resource_domains=[]),
        prefers_border=True,
    )
    return apps
