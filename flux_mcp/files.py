"""Every file-system policy of the server: where images are written and which local files may be read.

Both directions are attack surface for a server an agent drives: a task id or a download could
write outside the output directory, fill the disk, or leave a half-written file that later
looks complete; an image argument could make the server read `~/.ssh/id_rsa` and ship it to a
third party. Keeping the rules in one module means there is one place to audit. Writes stream
into a temp file in the destination directory (size capped while streaming, type checked by
magic bytes, not by the server's word) and are renamed into place only when complete; what a
killed process left half-written is swept. Reads resolve symlinks first and refuse anything
outside the configured roots, then open the file beneath its root one component at a time
without following symlinks (so a path swapped after the check cannot lead outside) and read from
that descriptor; a path that does not exist outside the roots is reported as "outside", so the
resolver cannot be used to probe for files. Images are decoded (thumbnails) or accepted (inputs)
only up to `MAX_IMAGE_PIXELS`, checked from the header. Where the bytes may come from, and how
long they may take, is `flux_mcp.download`'s policy. Blocking IO runs in worker threads.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread

from flux_mcp import errors
from flux_mcp.record import is_valid_task_id

if TYPE_CHECKING:
    from flux_mcp.client import PiAPIClient
    from flux_mcp.ledger import SavedImageRow

# Pillow is imported where an image is decoded, not here: starting the server and listing its
# tools never needs it (tests/test_cold_start.py).

log = logging.getLogger(__name__)

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_MIME_BY_SUFFIX = {f".{ext}": mime for mime, ext in _EXTENSIONS.items()} | {".jpeg": "image/jpeg"}
# Types a file host may send for anything; accepted only when the magic bytes say image.
_GENERIC_TYPES = frozenset({"", "image/jpg", "application/octet-stream", "binary/octet-stream", "application/binary"})
_SNIFF_BYTES = 12
# The most pixels an image may have to be decoded (thumbnails) or accepted (inputs): 25 MP, e.g.
# 6000x4000. Checked from the header, before decoding: a 12000x12000 PNG costs nothing.
MAX_IMAGE_PIXELS = 25_000_000
# A `.part` file untouched this long belongs to no live download (they write every few seconds).
STALE_PART_SECONDS = 3600
_PILLOW_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_DATA_URI = re.compile(r"^data:image/(png|jpeg|webp);base64,(.*)$", re.IGNORECASE | re.DOTALL)
# Two or more letters, so a Windows drive letter ("C:\\x") still reads as a path.
_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def sniff_image_type(head: bytes) -> str | None:
    """Content type from magic bytes (PNG, JPEG, WebP), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_task_id(task_id: str) -> str:
    """A task id is used as a file-name component, so it must be one."""
    if not is_valid_task_id(task_id):
        raise errors.StorageError(f"task id {task_id!r} is not safe to use in a file name")
    return task_id


_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _cleanup(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def sweep_partial_files(directory: Path, *, now: float | None = None) -> list[Path]:
    """Delete the `.part` files a killed download left in `directory`: those whose writing
    process (its pid is in the name) is gone, and any untouched for `STALE_PART_SECONDS` (a live
    download writes far more often). Returns what was deleted. Blocking."""
    now = time.time() if now is None else now
    removed = []
    try:
        candidates = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".part")]
    except OSError:
        return removed
    if not candidates:
        return removed
    from flux_mcp.ledger import pid_is_gone  # the ledger loads on a tool's first use, not at start

    for path in candidates:
        base = path.name.removesuffix(".part").removesuffix(".json")
        pid = base.rsplit(".", 2)[1] if base.count(".") >= 3 else ""
        try:
            stale = now - path.lstat().st_mtime > STALE_PART_SECONDS
            if stale or (pid.isdigit() and int(pid) != os.getpid() and pid_is_gone(int(pid))):
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    if removed:
        log.info("removed %d unfinished download(s) from %s", len(removed), directory)
    return removed


# Worker threads per store that save images at once (each step: write, fsync, sidecar, renames,
# and the preview when a caller waits to show it), and as many again that make previews from files.
# Each step is short and partly holds the GIL: a few threads keep the disk busy, while more only
# fight the event loop's thread for the GIL (measured at 1,000 calls in flight: 16 save threads
# answered calls a second later than 4). A thumbnail of a large image decodes it whole, so few at
# a time also bound the memory.
IMAGE_THREADS = 4
# Previews made while saving wait here for the call that shows them: a bounded few.
FRESH_PREVIEWS = 256
FRESH_PREVIEW_BYTES = 32 << 20

# A download is written in steps of this many bytes (one worker-thread step each); a typical
# image is smaller and is written, synced and renamed into place in a single step.
WRITE_BATCH_BYTES = 1 << 20


class _PartFile:
    """The temp file an image is written to, created on the first write; removed unless renamed."""

    def __init__(self, stem: str, threads: anyio.CapacityLimiter) -> None:
        self.stem = stem
        self.threads = threads
        self.fd: int | None = None
        self.path: Path | None = None
        self.sidecar: Path | None = None

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
        _cleanup(*(p for p in (self.path, self.sidecar) if p is not None))

    async def discard(self) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._remove, limiter=self.threads)


class ImageStore:
    """Saves downloaded task images as `<task_id>_<n>.<ext>` plus a `<task_id>_<n>.json` sidecar.

    Temp files are `.<task_id>_<n>.<pid>.<random>.part`; the server sweeps those whose process is
    gone when it starts (see `sweep_partial_files`)."""

    def __init__(self, output_dir: Path, *, max_bytes: int) -> None:
        """A save whose `preview()` says a caller is waiting to show the image makes its preview in
        the same worker-thread step, and keeps it for `take_preview` (the call that shows it needs
        no second step)."""
        self.output_dir = Path(output_dir)
        self.max_bytes = max_bytes
        self.threads = anyio.CapacityLimiter(IMAGE_THREADS)
        self._fresh: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._fresh_bytes = 0

    def take_preview(self, path: str) -> tuple[bytes, str] | None:
        """The preview made when `path` was saved, if it is still kept (each is given out once)."""
        preview = self._fresh.pop(path, None)
        if preview is not None:
            self._fresh_bytes -= len(preview[0])
        return preview

    def _keep_preview(self, path: str, preview: tuple[bytes, str]) -> None:
        self.take_preview(path)
        self._fresh[path] = preview
        self._fresh_bytes += len(preview[0])
        while len(self._fresh) > FRESH_PREVIEWS or self._fresh_bytes > FRESH_PREVIEW_BYTES:
            _, dropped = self._fresh.popitem(last=False)
            self._fresh_bytes -= len(dropped[0])

    def _write(self, part: _PartFile, data: bytes) -> None:
        """Append `data` to the temp file, creating it first if needed. Blocking.

        Plain `os` calls, as few as the work needs: under load each system call hands the GIL
        to the event loop's thread and waits to get it back."""
        if part.fd is None:
            part.path, part.fd = self._create_part(part.stem)
        _write_all(part.fd, data)

    def _create_part(self, stem: str) -> tuple[Path, int]:
        """A new temp file `.<stem>.<pid>.<random>.part`, open for writing (the directory is made
        when it is missing)."""
        made = False
        for _ in range(5):
            path = self.output_dir / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.part"
            try:
                return path, os.open(path, _CREATE_FLAGS, 0o600)
            except FileExistsError:
                continue
            except FileNotFoundError:
                if made:
                    raise errors.StorageError(f"cannot write to {self.output_dir}: it keeps vanishing") from None
                try:
                    self.output_dir.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise errors.StorageError(f"cannot write to {self.output_dir}: {exc}") from exc
                made = True
            except OSError as exc:
                raise errors.StorageError(f"cannot write to {self.output_dir}: {exc}") from exc
        raise errors.StorageError(f"cannot write to {self.output_dir}: no free temp file name")

    async def save(
        self,
        client: PiAPIClient,
        *,
        task_id: str,
        n: int,
        url: str,
        sidecar: dict[str, Any],
        preview: Callable[[], bool] = lambda: False,
    ) -> SavedImageRow:
        """Download `url` and save it, and its preview too when `preview()`, asked once the image
        is in, says a caller is waiting to show it (see `__init__`)."""
        from flux_mcp.catalog import MAX_PIXELS  # loaded with the tools that call this, not at start

        check_task_id(task_id)
        if n < 0:
            raise errors.StorageError(f"image index {n} must not be negative", task_id=task_id)
        stem = f"{task_id}_{n}"
        part = _PartFile(stem, self.threads)
        # The body is held in memory up to WRITE_BATCH_BYTES and written in one worker-thread step
        # per batch: a typical image costs one step in all (write, fsync, sidecar, renames), not a
        # thread hop per chunk. Memory per download stays bounded by the batch size.
        pending: list[bytes] = []
        buffered = 0
        try:
            digest = hashlib.sha256()
            size = 0
            head = b""
            detected: str | None = None
            async with client.stream_download(url) as response:
                _check_headers(url, response, self.max_bytes)
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise _too_big(url, self.max_bytes, f"more than {self.max_bytes} bytes received")
                    if detected is None and len(head) < _SNIFF_BYTES:
                        head += chunk[: _SNIFF_BYTES - len(head)]
                        if len(head) >= _SNIFF_BYTES:
                            detected = self._check_magic(url, head)
                    digest.update(chunk)
                    pending.append(chunk)
                    buffered += len(chunk)
                    if buffered >= WRITE_BATCH_BYTES:
                        batch, pending, buffered = b"".join(pending), [], 0
                        await anyio.to_thread.run_sync(self._write, part, batch, limiter=self.threads)
            if detected is None:
                detected = self._check_magic(url, head)
            final = self.output_dir / f"{stem}.{_EXTENSIONS[detected]}"
            sidecar_path = self.output_dir / f"{stem}.json"
            sha256 = digest.hexdigest()
            meta = {
                **sidecar,
                "task_id": task_id,
                "n": n,
                "source_url": url,
                "sha256": sha256,
                "bytes": size,
                "content_type": detected,
                "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }

            whole = part.fd is None  # nothing written yet: the image is all in `pending`
            shown = preview()  # asked now: a caller may have come, or gone, during the download

            def commit() -> tuple[bytes, str] | None:
                data = b"".join(pending)
                self._write(part, data)
                assert part.fd is not None and part.path is not None
                os.fsync(part.fd)
                part.close()
                # Sidecar first: the step most likely to fail (disk full) happens before any rename.
                part.sidecar = part.path.with_suffix(".json.part")
                text = json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
                fd = os.open(part.sidecar, _CREATE_FLAGS, 0o666)  # as `write_text` made it: the umask decides
                try:
                    _write_all(fd, text.encode())
                finally:
                    os.close(fd)
                os.replace(part.path, final)
                os.replace(part.sidecar, sidecar_path)
                if not shown:
                    return None
                # The image is saved: whatever happens to its preview now, the save stands.
                try:  # an image larger than PiAPI makes is left to the preview threads (memory)
                    return make_thumbnail(data if whole else final, max_pixels=MAX_PIXELS)
                except errors.StorageError as exc:
                    log.info("no preview made while saving %s: %s", final, exc.message)
                except Exception:
                    log.warning("no preview made while saving %s", final, exc_info=True)
                return None

            made = await anyio.to_thread.run_sync(commit, limiter=self.threads)
            if made is not None:
                self._keep_preview(str(final), made)
        except OSError as exc:
            await part.discard()
            raise errors.StorageError(f"saving {url} failed: {exc}", task_id=task_id) from exc
        except BaseException as exc:
            await part.discard()
            if isinstance(exc, errors.FluxError) and exc.task_id is None:
                exc.task_id = task_id
            raise
        log.info("saved %s (%d bytes) to %s", url, size, final)
        from flux_mcp.ledger import SavedImageRow

        return SavedImageRow(n=n, url=url, path=str(final), sha256=sha256, bytes=size)

    @staticmethod
    def _check_magic(url: str, head: bytes) -> str:
        detected = sniff_image_type(head)
        if detected is None:
            raise errors.StorageError(f"{url} did not return a PNG, JPEG or WebP image")
        return detected


def _webp_available() -> bool:
    from PIL import features

    return bool(features.check("webp"))


def _check_headers(url: str, response: Any, max_bytes: int) -> None:
    """Refuse a download before reading it: not an image type, or announced as too large."""
    declared = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if declared not in _EXTENSIONS and declared not in _GENERIC_TYPES:
        raise errors.StorageError(f"{url} is not an image (Content-Type {declared})")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_big(url, max_bytes, f"Content-Length {length}")


def mime_of(path: str | None) -> str:
    """The MIME type of a saved image, by its suffix (what `ImageStore.save` names it); PNG if unknown."""
    return _MIME_BY_SUFFIX.get(Path(path or "").suffix.lower(), "image/png")


def _too_big(url: str, max_bytes: int, size: str) -> errors.StorageError:
    return errors.StorageError(
        f"downloading {url} stopped: the image is larger than the {max_bytes}-byte limit ({size})",
        hint="Raise FLUX_MCP_MAX_DOWNLOAD_BYTES if this image is expected.",
    )


async def fetch_image(client: PiAPIClient, url: str, *, max_bytes: int) -> bytes:
    """An image PiAPI returned, read into memory (for a preview when no local copy is kept)."""
    data = bytearray()
    async with client.stream_download(url) as response:
        _check_headers(url, response, max_bytes)
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > max_bytes:
                raise _too_big(url, max_bytes, f"more than {max_bytes} bytes received")
    if sniff_image_type(bytes(data[:_SNIFF_BYTES])) is None:
        raise errors.StorageError(f"{url} did not return a PNG, JPEG or WebP image")
    return bytes(data)


def make_thumbnail(
    source: Path | bytes, *, max_side: int = 512, max_bytes: int = 200_000, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[bytes, str]:
    """A small preview of an image file or its bytes: longest side <= `max_side` (never upscaled),
    at most `max_bytes`. An image already within both limits (PNG, JPEG or WebP, no EXIF) is
    returned as it is, without decoding it. One of more than `max_pixels` is refused
    (`StorageError`) before anything is decoded.

    WebP with quality stepping down 80 -> 40, then smaller dimensions until it fits; JPEG when
    this Pillow has no WebP. Blocking: call it from a worker thread.
    """
    from PIL import Image, ImageOps

    webp = _webp_available()
    fmt, mime = ("WEBP", "image/webp") if webp else ("JPEG", "image/jpeg")
    try:
        with _open_header(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            # Opening reads the header only: refuse a huge canvas before a single pixel is decoded.
            _check_pixels(image.size, _name(source), max_pixels)
            original = _fits_as_is(source, image, max_side=max_side, max_bytes=max_bytes)
            if original is not None:
                return original
            image.draft("RGB", (max_side, max_side))  # JPEG decodes at a reduced scale
            image.load()  # decoded while the file is open: no conversion below may need it later
            ImageOps.exif_transpose(image, in_place=True)  # no copy of the full-size image
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            mode = "RGBA" if has_alpha and webp else "RGB"
            image = image.convert(mode) if image.mode != mode else image
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise errors.StorageError(f"cannot read {_name(source)} as an image: {exc}") from exc
    # reducing_gap=1: an integer box reduction first (1024 -> 512 is a 2x2 average), then Lanczos on
    # what is left: a third of the time of Lanczos alone for the same look at this size.
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=1.0)
    data = b""
    while True:
        for quality in (80, 70, 60, 50, 40):
            buffer = io.BytesIO()
            # WebP's fastest method: 4x less CPU than the default for a few hundred bytes more.
            image.save(buffer, format=fmt, quality=quality, method=0)
            data = buffer.getvalue()
            if len(data) <= max_bytes:
                return data, mime
        width, height = image.size
        if max(width, height) <= 16:
            log.warning("thumbnail of %s is %d bytes even at %dx%d", _name(source), len(data), width, height)
            return data, mime
        image = image.resize((max(1, int(width * 0.75)), max(1, int(height * 0.75))), Image.Resampling.LANCZOS)


def _fits_as_is(source: Path | bytes, image: Any, *, max_side: int, max_bytes: int) -> tuple[bytes, str] | None:
    """The image itself, when it already is a preview: small enough in pixels and bytes, in a
    format every host shows, with no EXIF (so no orientation to apply). Nothing is decoded."""
    mime = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}.get(image.format or "")
    if mime is None or max(image.size) > max_side or "exif" in image.info:
        return None
    data = source if isinstance(source, bytes) else source.read_bytes()
    if len(data) > max_bytes or sniff_image_type(data[:_SNIFF_BYTES]) != mime:
        return None
    return data, mime


def _name(source: Path | bytes) -> str:
    return f"{len(source)} bytes" if isinstance(source, bytes) else str(source)


def _open_header(source: Any) -> Any:
    """`Image.open` (it reads the header only); the size is checked against our own, lower
    `MAX_IMAGE_PIXELS` before anything is decoded, so Pillow's bomb warning would only be noise."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _check_pixels(size: tuple[int, int], name: str, limit: int = MAX_IMAGE_PIXELS) -> None:
    width, height = size
    if width * height > limit:
        raise errors.StorageError(f"{name} is {width}x{height} pixels, more than the {limit} decoded here")


def check_input_image(data: bytes, what: str) -> str:
    """The format ('png' | 'jpeg' | 'webp') of an input image, read from its header alone; an
    `InvalidInputError` if it is none of those or larger than `MAX_IMAGE_PIXELS`."""
    from PIL import Image

    try:
        with _open_header(io.BytesIO(data)) as image:
            fmt, (width, height) = _PILLOW_FORMATS.get(image.format or ""), image.size
    except Image.DecompressionBombError as exc:
        raise errors.InvalidInputError(f"{what} has far too many pixels ({exc})") from None
    except Exception:  # Pillow raises many types for malformed input; all mean "not an image".
        fmt, width, height = None, 0, 0
    if fmt is None:
        raise errors.InvalidInputError(f"{what} is not a PNG, JPEG or WebP image")
    if width * height > MAX_IMAGE_PIXELS:
        raise errors.InvalidInputError(
            f"{what} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS} accepted; scale it down first"
        )
    return fmt


def _open_beneath(root: Path, relative: Path) -> int:
    """Open `root/relative` one component at a time, each relative to the directory opened just
    before and none followed if it is a symlink: whatever is swapped in meanwhile, the file opened
    is beneath `root`. Where `dir_fd` is unsupported (Windows), the path is opened and its
    descriptor's final path checked instead."""
    base_flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    if os.open not in os.supports_dir_fd or not nofollow:  # pragma: no cover - Windows
        fd = os.open(root / relative, base_flags)
        if not Path(os.path.realpath(root / relative)).is_relative_to(root):
            os.close(fd)
            raise OSError(errno.ELOOP, "the path left its root while being opened")
        return fd
    fd = os.open(root, base_flags | getattr(os, "O_DIRECTORY", 0))
    try:
        parts = relative.parts
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            kind = getattr(os, "O_NONBLOCK", 0) if last else getattr(os, "O_DIRECTORY", 0)
            child = os.open(part, base_flags | nofollow | kind, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def to_data_uri(path: Path, *, max_bytes: int, field: str = "image", root: Path | None = None) -> str:
    """Turn a local image file inside `root` (default: its own directory) into what PiAPI accepts:
    opened once beneath the root without following any symlink on the way, then read from that
    descriptor, so a path swapped after it was checked cannot lead outside.

    This is the single place to change if we switch to PiAPI's upload endpoint instead of
    inlining local files as `data:` URIs.
    """
    root = path.parent if root is None else root
    try:
        fd = _open_beneath(root, path.relative_to(root))
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise errors.InvalidInputError(f"{field}: {path} is not a regular file")
        with os.fdopen(fd, "rb") as handle:
            if info.st_size > max_bytes:
                raise errors.InvalidInputError(
                    f"{field}: {path} is {info.st_size} bytes, more than the {max_bytes}-byte limit"
                )
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise errors.InvalidInputError(
                f"{field}: {path} changed while it was being opened (a symlink appeared on the way)"
            ) from exc
        raise errors.InvalidInputError(f"{field}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise errors.InvalidInputError(f"{field}: {path} is larger than the {max_bytes}-byte limit")
    fmt = check_input_image(data, f"{field}: {path}")
    return f"data:image/{fmt};base64,{base64.b64encode(data).decode('ascii')}"


class InputResolver:
    """Turns an image argument (URL, data URI, local path) into something PiAPI can fetch."""

    def __init__(self, roots: list[Path], *, max_bytes: int) -> None:
        self.roots = [Path(root).expanduser().resolve() for root in roots]
        self.max_bytes = max_bytes

    async def resolve(self, value: str, *, field: str) -> str:
        text = value.strip() if isinstance(value, str) else ""
        if not text:
            raise errors.InvalidInputError(f"{field}: expected an image URL, data URI or local file path")
        lowered = text.lower()
        if lowered.startswith(("http://", "https://")):
            from flux_mcp.catalog import check_http_url

            try:
                return check_http_url(text)
            except ValueError:
                raise errors.InvalidInputError(f"{field}: {text} is not a valid URL (no host?)") from None
        if lowered.startswith("data:"):
            await anyio.to_thread.run_sync(self._check_data_uri, text, field)
            return text
        if lowered.startswith("file:"):
            path_text = self._file_url_path(text, field)
        elif match := _URL_SCHEME.match(text):
            raise errors.InvalidInputError(
                f"{field}: unsupported URL scheme {match.group(1)!r}; use an http(s) URL, a "
                "data:image/...;base64 URI or a local file path"
            )
        else:
            path_text = text
        if "\x00" in path_text:  # no file name holds one; os.path would raise ValueError
            raise errors.InvalidInputError(f"{field}: a file path cannot contain a NUL character")
        return await anyio.to_thread.run_sync(self._local_to_data_uri, path_text, field)

    @staticmethod
    def _file_url_path(text: str, field: str) -> str:
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise errors.InvalidInputError(f"{field}: {text} is not a local file URL (use file:///absolute/path)")
        return unquote(parts.path)

    def _check_data_uri(self, text: str, field: str) -> None:
        match = _DATA_URI.match(text)
        if match is None:
            raise errors.InvalidInputError(
                f"{field}: data URIs must look like data:image/<png|jpeg|webp>;base64,<data>"
            )
        encoded = match.group(2)
        if len(encoded) // 4 * 3 > self.max_bytes + 3:
            raise errors.InvalidInputError(f"{field}: the data URI is larger than the {self.max_bytes}-byte limit")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise errors.InvalidInputError(f"{field}: the data URI is not valid base64") from exc
        if len(data) > self.max_bytes:
            raise errors.InvalidInputError(f"{field}: the data URI is larger than the {self.max_bytes}-byte limit")
        check_input_image(data, f"{field}: the data URI")

    def _inside_roots(self, path: Path) -> bool:
        return any(path.is_relative_to(root) for root in self.roots)

    def _outside(self, text: str, field: str) -> errors.InvalidInputError:
        roots = ", ".join(str(root) for root in self.roots) or "none configured"
        return errors.InvalidInputError(
            f"{field}: {text} is outside the allowed image roots ({roots}); set FLUX_MCP_IMAGE_ROOTS to allow more"
        )

    def _local_to_data_uri(self, text: str, field: str) -> str:
        try:
            candidate = Path(text).expanduser()
        except RuntimeError:  # "~someone" for an unknown user
            candidate = Path(text)
        lexical = Path(os.path.abspath(candidate))
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError, ValueError) as exc:
            # Existence is only reported for paths that would be allowed anyway, so the resolver
            # cannot be used to probe for files elsewhere.
            try:
                best = candidate.resolve(strict=False)
            except (OSError, RuntimeError, ValueError):
                best = lexical
            if not (self._inside_roots(lexical) and self._inside_roots(best)):
                raise self._outside(text, field) from None
            raise errors.InvalidInputError(f"{field}: {text} does not exist or cannot be read") from exc
        root = next((root for root in self.roots if resolved.is_relative_to(root)), None)
        if root is None:
            raise self._outside(text, field)
        return to_data_uri(resolved, max_bytes=self.max_bytes, field=field, root=root)
