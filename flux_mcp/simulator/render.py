"""Deterministic placeholder PNGs for the simulator's task outputs.

Each image is a real PNG of the size PiAPI would return: a vertical gradient between two colours
derived from a hash of the prompt, a few shapes derived from a hash of (task id, image index),
and the prompt itself written on top. The same (prompt, task id, index) always gives the same
bytes, while different prompts, tasks or batch positions give visibly different images, which is
enough for clients to test downloading, deduplication and size handling. The output size follows
the request: `width`/`height` for text-to-image, the input image's size for image-to-image kinds
when it is a `data:` URI (1024x1024 otherwise, since the simulator never downloads URLs), plus the
outpaint deltas. Rendering is CPU-bound; callers run it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import logging
import textwrap

from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from flux_mcp.catalog import TaskRequest

logger = logging.getLogger(__name__)

DEFAULT_SIDE = 1024
MAX_SIDE = 4096  # keeps absurd outpaint requests from exhausting memory
RGB = tuple[int, int, int]


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def _colour(data: bytes, offset: int) -> RGB:
    return (data[offset], data[offset + 1], data[offset + 2])


def data_uri_size(ref: str | None) -> tuple[int, int] | None:
    """The pixel size of a `data:` URI image, or None for URLs, paths and undecodable data."""
    if not ref or not ref.startswith("data:") or "," not in ref:
        return None
    header, payload = ref.split(",", 1)
    try:
        raw = base64.b64decode(payload, validate=False) if header.endswith(";base64") else payload.encode()
        with Image.open(io.BytesIO(raw)) as img:
            return img.size
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        logger.warning("simulator: could not read data URI image (%s); assuming 1024x1024", exc)
        return None


def output_size(request: TaskRequest) -> tuple[int, int]:
    """The (width, height) PiAPI would produce for `request`, clamped to MAX_SIDE per side."""
    inp = request.input
    width: int | None = getattr(inp, "width", None)
    height: int | None = getattr(inp, "height", None)
    source: str | None = getattr(inp, "image", None)
    controls = getattr(inp, "control_net_settings", None)
    if source is None and controls:
        source = controls[0].control_image
    if source is not None and (width is None or height is None):
        size = data_uri_size(source) or (DEFAULT_SIDE, DEFAULT_SIDE)
        width = width or size[0]
        height = height or size[1]
    width = width or DEFAULT_SIDE
    height = height or DEFAULT_SIDE
    for setting in getattr(inp, "custom_settings", None) or []:
        width += setting.outpaint_left + setting.outpaint_right
        height += setting.outpaint_top + setting.outpaint_bottom
    return max(1, min(width, MAX_SIDE)), max(1, min(height, MAX_SIDE))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def render_png(prompt: str, task_id: str, index: int, width: int, height: int) -> bytes:
    """Render one output image and return its PNG bytes."""
    palette = _digest("prompt", prompt)
    top = Image.new("RGB", (width, height), _colour(palette, 0))
    bottom = Image.new("RGB", (width, height), _colour(palette, 3))
    mask = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    img = Image.composite(bottom, top, mask)

    draw = ImageDraw.Draw(img)
    shapes = _digest("shapes", task_id, index)
    for n in range(4):
        chunk = shapes[n * 8 : n * 8 + 8]
        x0, y0 = chunk[0] * width // 256, chunk[1] * height // 256
        x1 = x0 + max(8, chunk[2] * width // 512)
        y1 = y0 + max(8, chunk[3] * height // 512)
        fill = _colour(chunk, 4)
        if chunk[7] % 2:
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=(0, 0, 0))
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=(255, 255, 255))

    font_size = max(10, min(width, height) // 24)
    font = _font(font_size)
    chars_per_line = max(8, int(width / (font_size * 0.6)))
    lines = [*textwrap.wrap(prompt, chars_per_line)[:6], f"#{index} {task_id[:8]}"]
    margin = max(4, font_size // 2)
    draw.multiline_text(
        (margin, margin),
        "\n".join(lines),
        fill=(255, 255, 255),
        font=font,
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )

    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


@functools.lru_cache(maxsize=16)
def plain_png(width: int, height: int) -> bytes:
    """A one-colour PNG of this size, made once: for load tests, where drawing each image would
    make the simulator the bottleneck (see `SimulatorConfig.plain_images`)."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 160)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def render_task_images(request: TaskRequest, task_id: str, *, plain: bool = False) -> list[bytes]:
    """All output images of a task, one per `batch_size`."""
    width, height = output_size(request)
    if plain:
        return [plain_png(width, height)] * request.image_count
    prompt = request.input.prompt
    return [render_png(prompt, task_id, n, width, height) for n in range(request.image_count)]
