"""File policy tests: downloads go through a real `PiAPIClient` over `httpx2.MockTransport`, and
input resolution runs against a real directory tree with symlinks in tmp_path.

The property test is the important one: whatever string an agent sends, the resolver either
refuses it or returns the bytes of a file under an allowed root, never anything else.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx2
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from flux_mcp import errors, files
from flux_mcp.client import PiAPIClient
from flux_mcp.files import ImageStore, InputResolver, make_thumbnail, to_data_uri


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 6), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def noise_png(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def client_for(handler: Callable[[httpx2.Request], httpx2.Response]) -> PiAPIClient:
    return PiAPIClient(
        "http://piapi.test", "secret-key", http=httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    )


def serve(body: bytes | AsyncIterator[bytes], content_type: str | None = "image/png") -> PiAPIClient:
    def handler(request: httpx2.Request) -> httpx2.Response:
        assert "x-api-key" not in request.headers
        headers = {"content-type": content_type} if content_type is not None else {}
        return httpx2.Response(200, headers=headers, content=body)

    return client_for(handler)


# --- ImageStore ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_save_writes_image_sidecar_and_checksum(tmp_path: Path) -> None:
    png = image_bytes()
    out = tmp_path / "out" / "nested"
    row = await ImageStore(out, max_bytes=1_000_000).save(
        serve(png), task_id="task-1", n=0, url="https://cdn.test/a.png", sidecar={"prompt": "a cat"}
    )
    saved = out / "task-1_0.png"
    assert row.path == str(saved) and row.n == 0 and row.url == "https://cdn.test/a.png"
    assert saved.read_bytes() == png
    assert row.sha256 == hashlib.sha256(png).hexdigest() and row.bytes == len(png)
    meta = json.loads((out / "task-1_0.json").read_text())
    assert meta["prompt"] == "a cat"
    assert meta["task_id"] == "task-1" and meta["n"] == 0
    assert meta["source_url"] == "https://cdn.test/a.png"
    assert meta["sha256"] == row.sha256 and meta["bytes"] == len(png)
    assert meta["content_type"] == "image/png"
    assert meta["saved_at"].endswith("+00:00")
    assert sorted(p.name for p in out.iterdir()) == ["task-1_0.json", "task-1_0.png"]


@pytest.mark.anyio
async def test_a_missing_output_folder_is_made_even_after_a_temp_name_clash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "gone" / "images"
    out.mkdir(parents=True)
    names = iter(["clash", "fresh", "other"])
    clash = out / f".t_0.{os.getpid()}.clash.part"
    clash.write_bytes(b"someone else's")

    def token_hex(_: int) -> str:
        name = next(names)
        if name == "fresh":  # after the clash, the folder goes away
            clash.unlink()
            out.rmdir()
        return name

    monkeypatch.setattr(files.secrets, "token_hex", token_hex)
    row = await ImageStore(out, max_bytes=1_000_000).save(serve(image_bytes()), task_id="t", n=0, url="u", sidecar={})
    assert row.path == str(out / "t_0.png") and listing(out) == ["t_0.json", "t_0.png"]


@pytest.mark.anyio
async def test_an_output_folder_that_cannot_be_made_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(errors.StorageError, match="cannot write to"):
        await ImageStore(blocker / "images", max_bytes=1_000_000).save(
            serve(image_bytes()), task_id="t", n=0, url="u", sidecar={}
        )
    assert listing(tmp_path) == ["a-file"]


@pytest.mark.anyio
async def test_a_save_asked_for_a_preview_makes_it_in_its_step_and_gives_it_out_once(tmp_path: Path) -> None:
    """The call that shows a preview gets the one made in the save's own worker-thread step."""
    png = image_bytes()
    store = ImageStore(tmp_path, max_bytes=1_000_000)
    row = await store.save(serve(png), task_id="t", n=0, url="https://cdn.test/a.png", sidecar={}, preview=lambda: True)
    assert row.path is not None
    assert store.take_preview(row.path) == make_thumbnail(Path(row.path))
    assert store.take_preview(row.path) is None  # given out once; later previews come from the file
    row = await store.save(serve(png), task_id="t", n=1, url="https://cdn.test/b.png", sidecar={})
    assert row.path is not None and store.take_preview(row.path) is None  # not asked: none made


@pytest.mark.anyio
async def test_previews_made_while_saving_are_kept_only_up_to_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files, "FRESH_PREVIEWS", 2)
    store = ImageStore(tmp_path, max_bytes=1_000_000)
    paths = []
    for n in range(3):
        row = await store.save(
            serve(image_bytes()), task_id="t", n=n, url=f"https://cdn.test/{n}", sidecar={}, preview=lambda: True
        )
        paths.append(row.path)
    assert store.take_preview(paths[0]) is None  # the oldest made way
    assert store.take_preview(paths[1]) is not None and store.take_preview(paths[2]) is not None
    monkeypatch.setattr(files, "FRESH_PREVIEW_BYTES", 10)  # and by size: none this large is kept
    row = await store.save(
        serve(image_bytes()), task_id="t", n=3, url="https://cdn.test/3", sidecar={}, preview=lambda: True
    )
    assert row.path is not None and store.take_preview(row.path) is None


@pytest.mark.anyio
async def test_a_preview_that_fails_in_any_way_leaves_the_save_standing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a decoder bug")

    monkeypatch.setattr(files, "make_thumbnail", broken)
    store = ImageStore(tmp_path, max_bytes=1_000_000)
    row = await store.save(
        serve(image_bytes()), task_id="t", n=0, url="https://cdn.test/a", sidecar={}, preview=lambda: True
    )
    assert row.path is not None and Path(row.path).read_bytes() == image_bytes()
    assert store.take_preview(row.path) is None
    assert listing(tmp_path) == ["t_0.json", "t_0.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "t_0.json").stat().st_mode & 0o777 == 0o666 & ~umask  # the sidecar: as any file
    assert (tmp_path / "t_0.png").stat().st_mode & 0o777 == 0o600  # the image: its owner's alone, as before


@pytest.mark.anyio
async def test_an_image_larger_than_piapi_makes_is_saved_without_a_preview_in_the_save(tmp_path: Path) -> None:
    """The save step makes previews only of images PiAPI could have made (at most 1 MP, decoded in
    a few MB); a larger one is left to the preview threads, which still make one from the file."""
    big = io.BytesIO()
    Image.new("RGB", (1100, 1000), "teal").save(big, format="PNG")
    store = ImageStore(tmp_path, max_bytes=10_000_000)
    row = await store.save(
        serve(big.getvalue()), task_id="t", n=0, url="https://cdn.test/big", sidecar={}, preview=lambda: True
    )
    assert row.path is not None and Path(row.path).read_bytes() == big.getvalue()
    assert store.take_preview(row.path) is None
    data, _ = make_thumbnail(Path(row.path))
    with Image.open(io.BytesIO(data)) as thumb:
        assert max(thumb.size) == 512


@pytest.mark.anyio
async def test_generic_content_type_accepted_by_magic_bytes(tmp_path: Path) -> None:
    jpeg = image_bytes("JPEG")
    store = ImageStore(tmp_path, max_bytes=1_000_000)
    row = await store.save(
        serve(jpeg, "application/octet-stream"), task_id="t", n=1, url="https://cdn.test/x", sidecar={}
    )
    assert row.path == str(tmp_path / "t_1.jpg")
    webp = image_bytes("WEBP")
    row = await store.save(serve(webp, None), task_id="t", n=2, url="https://cdn.test/y", sidecar={})
    assert row.path == str(tmp_path / "t_2.webp")


@pytest.mark.anyio
async def test_size_cap_from_content_length(tmp_path: Path) -> None:
    store = ImageStore(tmp_path, max_bytes=100)
    with pytest.raises(errors.StorageError, match="limit") as info:
        await store.save(serve(noise_png()), task_id="t", n=0, url="https://c/x", sidecar={})
    assert info.value.task_id == "t"
    assert listing(tmp_path) == []


@pytest.mark.anyio
async def test_size_cap_while_streaming_leaves_no_partial_file(tmp_path: Path) -> None:
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"\x89PNG\r\n\x1a\n" + b"\0" * 56
        for _ in range(1000):
            sent.append(1)
            yield b"\0" * 64

    store = ImageStore(tmp_path, max_bytes=1000)
    with pytest.raises(errors.StorageError, match="limit"):
        await store.save(serve(body()), task_id="t", n=0, url="https://c/x", sidecar={})
    assert len(sent) < 50  # aborted early, not after reading everything
    assert listing(tmp_path) == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (image_bytes(), "text/html"),
        (b"<html>not an image</html>", "image/png"),
        (b"<html>not an image</html>", None),
        (b"\x89PN", "image/png"),
    ],
)
async def test_non_images_rejected(tmp_path: Path, body: bytes, content_type: str | None) -> None:
    with pytest.raises(errors.StorageError):
        await ImageStore(tmp_path, max_bytes=10_000).save(
            serve(body, content_type), task_id="t", n=0, url="https://c/x", sidecar={}
        )
    assert listing(tmp_path) == []


@pytest.mark.anyio
async def test_http_error_leaves_no_file(tmp_path: Path) -> None:
    client = client_for(lambda request: httpx2.Response(404))
    with pytest.raises(errors.StorageError, match="404"):
        await ImageStore(tmp_path, max_bytes=10_000).save(client, task_id="t", n=0, url="https://c/x", sidecar={})
    assert listing(tmp_path) == []


@pytest.mark.anyio
@pytest.mark.parametrize("task_id", ["../evil", "a/b", "..", "x..y", "", "a" * 129, "a b", "t\0"])
async def test_unsafe_task_id_rejected(tmp_path: Path, task_id: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(errors.StorageError, match="task id"):
        await ImageStore(out, max_bytes=10_000).save(
            serve(image_bytes()), task_id=task_id, n=0, url="https://c/x", sidecar={}
        )
    assert not out.exists()


# --- thumbnails ------------------------------------------------------------------------------


def test_thumbnail_caps_noisy_image(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    Image.frombytes("RGB", (2000, 1500), os.urandom(2000 * 1500 * 3)).save(path, compress_level=0)
    data, mime = make_thumbnail(path)
    assert mime == "image/webp" and len(data) <= 200_000
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "WEBP"
        assert max(thumb.size) <= 512
        assert abs(thumb.size[0] / thumb.size[1] - 4 / 3) < 0.02


def test_thumbnail_never_upscales_and_keeps_alpha(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGBA", (40, 30), (0, 0, 255, 128)).save(path)
    data, _ = make_thumbnail(path)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (40, 30)
        assert thumb.mode == "RGBA"


def test_an_image_that_already_fits_is_its_own_thumbnail(tmp_path: Path) -> None:
    """No decode and no re-encode: the bytes come back as they are, with their own type."""
    path = tmp_path / "small.png"
    Image.new("RGB", (512, 384), "teal").save(path)
    assert make_thumbnail(path) == (path.read_bytes(), "image/png")
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 200), "navy").save(jpeg, format="JPEG")
    assert make_thumbnail(jpeg.getvalue()) == (jpeg.getvalue(), "image/jpeg")


def test_an_image_over_either_limit_or_with_exif_is_re_encoded(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (513, 100), "teal").save(big)
    noisy = tmp_path / "noisy.png"
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(noisy, compress_level=0)
    for path in (big, noisy):
        assert make_thumbnail(path, max_bytes=100_000)[1] != "image/png"
    # EXIF orientation 6 (rotate 90): the preview must come out upright, so it is decoded.
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (200, 100), "red").save(rotated, format="JPEG", exif=exif)
    data, _ = make_thumbnail(rotated.getvalue())
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (100, 200)


def test_thumbnail_falls_back_to_jpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "_webp_available", lambda: False)
    path = tmp_path / "p.png"
    Image.new("RGBA", (1024, 256), "green").save(path)
    data, mime = make_thumbnail(path, max_side=128)
    assert mime == "image/jpeg"
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (128, 32)


def test_thumbnail_of_non_image_is_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("nope")
    with pytest.raises(errors.StorageError):
        make_thumbnail(path)


# --- InputResolver ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """base/root (allowed) and base/outside, with symlinks both ways."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "good.png").write_bytes(image_bytes(color="red"))
    (root / "sub" / "inner.jpg").write_bytes(image_bytes("JPEG", color="blue"))
    (root / "notes.txt").write_text("just text")
    (root / "big.png").write_bytes(noise_png())
    (outside / "secret.png").write_bytes(image_bytes(color="black"))
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (outside / "backlink.png").symlink_to(root / "good.png")
    return tmp_path


def data_uri_bytes(uri: str) -> bytes:
    assert uri.startswith("data:image/")
    return base64.b64decode(uri.split(",", 1)[1])


@pytest.mark.anyio
async def test_urls_pass_through(tree: Path) -> None:
    resolver = InputResolver([tree / "root"], max_bytes=100_000)
    for url in ("https://example.com/a.png", "http://example.com/a.png?x=1"):
        assert await resolver.resolve(url, field="image") == url


@pytest.mark.anyio
@pytest.mark.parametrize(
    "value",
    ["ftp://example.com/a.png", "javascript:alert(1)", "gopher://x", "https://", "file://evil.host/etc/x", " "],
)
async def test_other_schemes_rejected(tree: Path, value: str) -> None:
    resolver = InputResolver([tree / "root"], max_bytes=100_000)
    with pytest.raises(errors.InvalidInputError, match=r"^mask_image:"):
        await resolver.resolve(value, field="mask_image")


@pytest.mark.anyio
async def test_data_uri_ok_and_bad(tree: Path) -> None:
    resolver = InputResolver([tree / "root"], max_bytes=1000)
    good = "data:image/png;base64," + base64.b64encode(image_bytes()).decode()
    assert await resolver.resolve(good, field="image") == good
    bad = [
        "data:image/png;base64,!!!not-base64!!!",
        "data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode(),
        "data:image/gif;base64," + base64.b64encode(image_bytes("GIF")).decode(),
        "data:text/plain;base64,aGVsbG8=",
        "data:image/png," + "abc",
        "data:image/png;base64," + base64.b64encode(noise_png()).decode(),
    ]
    for value in bad:
        with pytest.raises(errors.InvalidInputError, match=r"^image:"):
            await resolver.resolve(value, field="image")


@pytest.mark.anyio
async def test_paths_inside_root_become_data_uris(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tree / "root"
    resolver = InputResolver([root], max_bytes=100_000)
    good = (root / "good.png").read_bytes()
    uri = await resolver.resolve(str(root / "good.png"), field="image")
    assert uri.startswith("data:image/png;base64,") and data_uri_bytes(uri) == good
    uri = await resolver.resolve(str(root / "sub" / "inner.jpg"), field="image")
    assert uri.startswith("data:image/jpeg;base64,")
    assert data_uri_bytes(await resolver.resolve(f"file://{root}/good.png", field="image")) == good
    assert data_uri_bytes(await resolver.resolve(str(tree / "outside" / "backlink.png"), field="i")) == good
    monkeypatch.chdir(root)
    assert data_uri_bytes(await resolver.resolve("sub/../good.png", field="image")) == good
    monkeypatch.setenv("HOME", str(root))
    assert data_uri_bytes(await resolver.resolve("~/good.png", field="image")) == good


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("relative", "reason"),
    [
        ("root/../outside/secret.png", "outside the allowed image roots"),
        ("root/link.png", "outside the allowed image roots"),
        ("root/dirlink/secret.png", "outside the allowed image roots"),
        ("outside/secret.png", "outside the allowed image roots"),
        ("outside/missing.png", "outside the allowed image roots"),
        ("root/missing.png", "does not exist"),
        ("root/notes.txt", "not a PNG, JPEG or WebP"),
        ("root/big.png", "limit"),
        ("root/sub", "not a regular file"),
    ],
)
async def test_paths_rejected(tree: Path, relative: str, reason: str) -> None:
    other_root = tree / "pictures"
    resolver = InputResolver([tree / "root", other_root], max_bytes=1000)
    value = f"{tree}/{relative}"
    with pytest.raises(errors.InvalidInputError) as info:
        await resolver.resolve(value, field="image_url")
    message = info.value.message
    assert message.startswith("image_url: ") and reason in message
    if "outside" in reason:
        assert f"({tree / 'root'}, {other_root})" in message
        assert "FLUX_MCP_IMAGE_ROOTS" in message


@pytest.mark.anyio
async def test_absolute_system_path_rejected(tree: Path) -> None:
    resolver = InputResolver([tree / "root"], max_bytes=100_000)
    for value in ("/etc/passwd", "file:///etc/passwd", "/nonexistent/x.png"):
        with pytest.raises(errors.InvalidInputError, match="outside the allowed image roots"):
            await resolver.resolve(value, field="image")


def test_to_data_uri_is_the_single_conversion(tree: Path) -> None:
    path = tree / "root" / "good.png"
    uri = to_data_uri(path, max_bytes=100_000)
    assert data_uri_bytes(uri) == path.read_bytes()
    with pytest.raises(errors.InvalidInputError, match=r"^ref:"):
        to_data_uri(tree / "root" / "notes.txt", max_bytes=100_000, field="ref")


_PARTS = st.sampled_from(
    ["root", "outside", "..", ".", "", "good.png", "secret.png", "link.png", "backlink.png", "dirlink",
     "sub", "inner.jpg", "notes.txt", "missing.png", "~", "%2e%2e", "root/good.png", "root/sub/inner.jpg",
     "outside/backlink.png", "root/dirlink/backlink.png"]
)  # fmt: skip
_PREFIXES = st.sampled_from(["", "/", "./", "BASE/", "file://BASE/", "file:BASE/", "~/", "ROOT/", "file://ROOT/"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=st.one_of(
        st.builds(lambda p, parts: p + "/".join(parts), _PREFIXES, st.lists(_PARTS, min_size=1, max_size=4)),
        st.text(max_size=40),
        st.sampled_from(
            [
                "root/good.png",
                "ROOT/sub/../good.png",
                "file://ROOT/sub/inner.jpg",
                "ROOT/link.png",
                "BASE/outside/backlink.png",
                "ROOT/dirlink/backlink.png",
                "ROOT/dirlink/secret.png",
            ]
        ),
    )
)
def test_resolver_never_escapes_roots(tree: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    root = tree / "root"
    monkeypatch.chdir(tree)
    allowed = {p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}
    resolver = InputResolver([root], max_bytes=100_000)
    value = value.replace("BASE", str(tree)).replace("ROOT", str(root))
    try:
        result = anyio.run(functools.partial(resolver.resolve, value, field="image"))
    except errors.InvalidInputError as exc:
        assert exc.message.startswith("image:")
        event("rejected: outside" if "outside" in exc.message else "rejected: other")
        return
    event(result[:10])
    if result.startswith("data:"):
        assert data_uri_bytes(result) in allowed
    else:
        assert result == value.strip() and result.lower().startswith(("http://", "https://"))
