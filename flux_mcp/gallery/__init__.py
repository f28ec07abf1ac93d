"""Looking at what was made: one view (`view.html`, self-contained HTML, CSS and JS) shown two ways.

- `page.py`: the local history page, a small Starlette app over the ledger
  (`piapi-flux-mcp gallery`, and `/gallery` on the HTTP transport).
- `apps.py`: the same view as an MCP App (`ui://` resource) attached to the task tools, talking
  to the host over the Apps bridge, with app-only actions.

The view picks its backend from one `<meta name="flux-gallery-mode">` tag, set by `view_html`.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Literal

_MODE_TAG = '<meta name="flux-gallery-mode" content="app">'


@cache
def view_html(mode: Literal["app", "page"]) -> str:
    html = files(__package__).joinpath("view.html").read_text(encoding="utf-8")
    assert _MODE_TAG in html
    return html.replace(_MODE_TAG, f'<meta name="flux-gallery-mode" content="{mode}">')
