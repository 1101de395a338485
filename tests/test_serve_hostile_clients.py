"""What a hostile or careless client cannot do to `cliplab serve` (each found by a security
audit): make it enlarge a thin strip to gigabytes, reach a decoder cliplab does not read (an
EPS handed to Ghostscript), read a file an indexed link was pointed at, make it buffer bodies
without the key, in any number or for ever, starve searches with queued decodes, or make it
decode a large original once per thumbnail size; and a bug's 500 is JSON like every error."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import anyio
import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.data.images import fit_to_model, open_image  # noqa: E402
from cliplab.models import preprocess  # noqa: E402
from cliplab.models.dual_encoder import DualEncoder  # noqa: E402
from cliplab.models.preprocess import enlarged_span, keep_ratio_size, resize_like_pil  # noqa: E402
from cliplab.serve import image_files, search_service  # noqa: E402
from cliplab.serve.app import create_app  # noqa: E402
from cliplab.serve.index import SearchIndex  # noqa: E402
from cliplab.serve.middleware import BodyLimit  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.serve_helpers import build, save_tiny_model  # noqa: E402

KEY = "s3cret-key"
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto "
       b"stroke\nshowpage\n%%EOF\n")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _indexed_folder(root: Path) -> dict:
    """An index of four coloured 40 px PNGs (one named .jpg) over a tiny 16 px model."""
    folder = root / "photos"
    folder.mkdir()
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255), (0, 255, 0))):
        Image.new("RGB", (40, 40), colour).save(folder / f"c{i}.png")
    Image.new("RGB", (900, 600), (200, 200, 0)).save(folder / "named.jpg", format="PNG")
    model_dir = save_tiny_model(root / "model")
    build(model_dir, str(folder), root / "idx")
    index = SearchIndex(root / "idx")
    ids = {Path(index.image_source(row)["file"]).name: i
           for i, row in index.items(range(index.count)).items()}
    return {"root": root, "folder": folder, "index": index, "ids": ids,
            "model": DualEncoder.load(model_dir)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return _indexed_folder(tmp_path_factory.mktemp("hostile"))


def test_enlarged_span_keeps_the_central_sixteen_to_one_part():
    """Hand-computed: a 1 x 100 strip enlarged to 16 px keeps columns 42..57 (16 = 16 x 1,
    (100 - 16) / 2 = 42 cut from each end); an odd remainder widens the span by one so both
    ends lose alike; an image the model shrinks, or no longer than 16:1, is kept whole."""
    assert enlarged_span(1, 100, 16) == (slice(None), slice(42, 58))
    assert enlarged_span(100, 1, 16) == (slice(42, 58), slice(None))
    assert enlarged_span(3, 101, 16) == (slice(None), slice(26, 75))  # span 48 + 1
    assert enlarged_span(20, 1000, 16) == (slice(None), slice(None))  # shrunk, not enlarged
    assert enlarged_span(10, 160, 16) == (slice(None), slice(None))  # 16:1 exactly


def test_a_thin_strip_is_never_enlarged_whole(monkeypatch):
    """A 1 KB PNG of 1,000,000 x 1 pixels was enlarged to 16 x 16,000,000 floats (3 GB for a
    16 px model, 6 GB at 224 px for 1 x 10,000) for the 16 x 16 centre the model keeps."""
    asked = []
    real = preprocess.resize_like_pil

    def spy(x, size, interpolation):
        asked.append(tuple(size))
        assert max(size) <= 16 * 16 + 1, f"enlarged to {size}"
        return real(x, size, interpolation)

    monkeypatch.setattr(preprocess, "resize_like_pil", spy)
    cfg = preprocess.PreprocessConfig(image_size=16)
    strip = torch.randint(0, 256, (1, 1, 1_000_000, 3), dtype=torch.uint8)
    assert preprocess.ImagePreprocessor(cfg)(strip).shape == (1, 3, 16, 16)
    assert asked == [(16, 256)]
    # an upload or an indexed file is cut before it is even made RGB
    assert fit_to_model(Image.new("L", (1_000_000, 1)), cfg).size == (16, 1)
    assert fit_to_model(Image.new("L", (1, 999_999)), cfg).size == (1, 17)


@pytest.mark.parametrize("size", [16, 64, 224])
def test_the_cut_moves_the_kept_centre_by_under_a_pixel(size):
    """Against the whole strip enlarged (the old way, by hand): on a ramp whose value is its
    column, every kept pixel's source column differs by less than one output pixel."""
    rng = np.random.default_rng(size)
    for _ in range(40):
        h = int(rng.integers(1, size))
        w = int(rng.integers(16 * h + 1, 200 * h + 2))
        ramp = torch.arange(w, dtype=torch.float64).expand(1, 1, h, w).clone()
        nh, nw = keep_ratio_size(h, w, size, "shortest")
        whole = resize_like_pil(ramp, (nh, nw), "bilinear")
        top, left = (nh - size) // 2, (nw - size) // 2
        whole = whole[..., top:top + size, left:left + size]
        cut = preprocess.resize_center_crop(ramp, size, "shortest", "bilinear")
        shift = (whole - cut).abs()[..., 1:-1].max().item() * nw / w  # in output pixels
        assert shift < 1, (h, w, shift)


def test_uploads_reach_only_the_formats_cliplab_reads(served, monkeypatch):
    """An EPS named .png went to Ghostscript (remote code execution in its -dSAFER escapes); a
    DDS with a bad header raised NotImplementedError, a plain-text 500. Now neither decoder is
    reached: a 415 naming the formats read."""
    from PIL import EpsImagePlugin

    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **kw: ran.append(a))
    dds = io.BytesIO()
    Image.new("RGB", (4, 4)).save(dds, "DDS")
    bad_dds = bytearray(dds.getvalue())
    bad_dds[80:84] = bytes(4)  # no pixel format flags: Pillow raises NotImplementedError
    client = TestClient(create_app(served["index"], served["model"]),
                        raise_server_exceptions=False)
    for name, data in (("x.png", EPS), ("y.png", bytes(bad_dds))):
        for route, form in (("/api/search/image", {}), ("/api/classify", {"labels": "a, b"})):
            answer = client.post(route, data=form, files={"file": (name, data, "image/png")})
            assert answer.status_code == 415, (name, route, answer.text)
            assert "format cliplab reads (PNG, JPEG, WebP" in answer.json()["error"]
    assert ran == []
    with pytest.raises(UnidentifiedImageError):
        open_image(EPS)


def test_a_bug_is_a_json_500_with_the_hardening_headers(served, monkeypatch):
    """Starlette answers an unexpected exception in plain text, outside every middleware."""
    def broken(*args, **kwargs):
        raise RuntimeError("/srv/secret/path failed")

    monkeypatch.setattr(served["index"], "search", broken)
    client = TestClient(create_app(served["index"], served["model"]),
                        raise_server_exceptions=False)
    answer = client.get("/api/search", params={"q": "red"})
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (RuntimeError); the server's log says more"}
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["x-frame-options"] == "DENY"


def test_an_image_is_sent_as_what_its_file_holds_now(tmp_path):
    """A PNG named .jpg goes out as image/png (by content, not name); an indexed file swapped
    for a link to another file (a text file here) is a 404, not that file's bytes."""
    served = _indexed_folder(tmp_path)
    client = TestClient(create_app(served["index"], served["model"]))
    named = client.get(f"/images/{served['ids']['named.jpg']}")
    assert named.status_code == 200 and named.headers["content-type"] == "image/png"
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n", encoding="utf-8")
    swapped = served["folder"] / "c1.png"
    swapped.unlink()
    os.symlink(secret, swapped)
    for path in (f"/images/{served['ids']['c1.png']}", f"/images/{served['ids']['c1.png']}"
                 "/thumbnail"):
        answer = client.get(path)
        assert answer.status_code == 404 and b"hunter2" not in answer.content, path
    assert "no longer holds an image" in client.get(
        f"/images/{served['ids']['c1.png']}").json()["error"]


def test_the_api_key_is_checked_before_the_body_is_read(served):
    """Without the key an upload over the limit was buffered whole and answered 413: any
    client could make the server hold bodies. Now it is a 401 before any of it is read."""
    client = TestClient(create_app(served["index"], served["model"], api_key=KEY,
                                   max_upload_bytes=1000))
    files = {"file": ("big.png", b"x" * 5000, "image/png")}
    refused = client.post("/api/search/image", files=files)
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert client.post("/api/search/image", files=files,
                       headers={"X-API-Key": KEY}).status_code == 413
    assert client.get("/openapi.json").status_code == 200  # the schema stays open


def _body_limited(limit: int, **kw):
    """A BodyLimit over an app that answers 200 with the body's length."""
    async def echo(scope, receive, send):
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(message["body"])).encode()})

    return BodyLimit(echo, limit, **kw)


async def _call(app, chunks: list[bytes], gate: anyio.Event | None = None,
                path: str = "/api/search/image", **scope) -> int:
    """POST ``chunks`` to ``path`` as one body (waiting at ``gate`` before the last); the
    status."""
    sent: list[dict] = []
    queue = list(chunks)

    async def receive():
        if gate is not None and len(queue) == 1:
            await gate.wait()
        chunk = queue.pop(0) if queue else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    async def send(message):
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": path, "headers": [], **scope}, receive,
              send)
    return sent[0]["status"]


def test_bodies_held_at_once_are_bounded_and_must_arrive_in_time():
    """Forty stalled uploads held 320 MB and never timed out: past ``bodies_at_once`` x the
    limit held at once a new body gets a 503, and one not received in time a 408."""
    async def main():
        app = _body_limited(10, bodies_at_once=1)
        gate, statuses = anyio.Event(), {}

        async def first():
            statuses["first"] = await _call(app, [b"12345678", b"9"], gate)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(first)
            await anyio.sleep(0.05)  # the first holds 8 bytes and waits for its last one
            statuses["second"] = await _call(app, [b"abcdef"])
            gate.set()
        assert statuses == {"first": 200, "second": 503}
        assert app.held == 0  # all given back
        assert await _call(app, [b"abcdef"]) == 200
        slow = _body_limited(10, timeout_s=0.05)
        assert await _call(slow, [b"a", b"b"], anyio.Event()) == 408  # its gate never opens
        assert slow.held == 0

    anyio.run(main)


def test_only_bodies_sent_to_the_api_are_held():
    """Bodies were read on every path, before and whatever the key check: a client without the
    key filled the budget with stalled POSTs to the page. Only the API's are read now (after
    the key check), so a stalled POST elsewhere holds nothing."""
    async def main():
        app = _body_limited(10, bodies_at_once=1)
        gate, statuses = anyio.Event(), {}

        async def elsewhere():
            statuses["page"] = await _call(app, [b"12345678", b"9"], gate, path="/")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(elsewhere)
            await anyio.sleep(0.05)
            assert app.held == 0
            statuses["api"] = await _call(app, [b"abcdef"])
            gate.set()
        assert statuses == {"page": 200, "api": 200}
        # the API behind a root path is still the API
        assert await _call(app, [b"x" * 11], path="/app/api/x", root_path="/app") == 413
        assert await _call(app, [b"x" * 11], path="/apix") == 200

    anyio.run(main)


def test_queued_decodes_beyond_the_line_get_a_503(served, monkeypatch):
    """Each upload waiting to decode held one of the server's worker threads: 80 queued made a
    text search wait 8 s. Past the line a request gets a 503 with Retry-After."""
    monkeypatch.setattr(image_files, "DECODES_IN_LINE", 1)
    client = TestClient(create_app(served["index"], served["model"]))
    holding, release = threading.Event(), threading.Event()

    def hold():
        with image_files.decode_slot():
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert holding.wait(30)
        upload = {"file": ("c.png", _png(Image.new("RGB", (20, 20))), "image/png")}
        busy = client.post("/api/search/image", files=upload)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert "busy decoding" in busy.json()["error"]
        thumb = client.get(f"/images/{served['ids']['c0.png']}/thumbnail", params={"size": 70})
        assert thumb.status_code == 503 and "busy decoding" in thumb.json()["error"]
        assert client.get("/api/search", params={"q": "red"}).status_code == 200
    finally:
        release.set()
        worker.join(30)
    assert client.post("/api/search/image", files=upload).status_code == 200


def test_thumbnail_sizes_decode_a_large_original_once_per_step(served, monkeypatch):
    """Every size from 64 to 512 was a full decode of the original (449 for one image); now
    the original is decoded once per step (64, 128, 256, 512) and other sizes shrink the step
    above, each the size asked (its other side within a pixel of the original's aspect)."""
    decoded = []
    real = search_service.thumbnail

    def counted(source, size):
        if isinstance(source, Path):
            decoded.append(size)
        return real(source, size)

    monkeypatch.setattr(search_service, "thumbnail", counted)
    client = TestClient(create_app(served["index"], served["model"]))
    item = served["ids"]["named.jpg"]  # 900 x 600
    for size in range(200, 261, 4):
        answer = client.get(f"/images/{item}/thumbnail", params={"size": size})
        width, height = Image.open(io.BytesIO(answer.content)).size
        assert width == size and abs(height - size * 2 / 3) < 1, (size, height)
    assert decoded == [256, 512]


def test_the_thumbnail_cache_is_bounded_by_bytes():
    """Bounded by its number of entries (2048), the cache held whole originals of up to 512
    px (a noisy 512 px PNG is ~0.8 MB: ~1.6 GB at the cap); now by their bytes, least
    recently used first out."""
    from cliplab.serve.sized_cache import SizedLru

    cache, made = SizedLru(10), []

    def get(key, value):
        return cache.get(key, lambda: made.append(key) or value, len)

    for key in "abc":
        assert get(key, key * 4) == key * 4
    assert (cache.held, len(cache), made) == (8, 2, ["a", "b", "c"])  # a dropped for c
    assert get("b", "") == "bbbb" and made == ["a", "b", "c"]  # a hit, now the newest
    get("d", "dddd")
    assert get("b", "") == "bbbb" and get("c", "cccc") == "cccc" and made[-1] == "c"
    assert get("big", "x" * 11) == "x" * 11 and cache.held <= 10 and len(cache) == 2


def test_thumbnails_served_stay_within_the_cache_budget(served, monkeypatch):
    """Every thumbnail size of every image: what the cache holds stays within its budget,
    and a thumbnail asked again is not made again."""
    from cliplab.serve.sized_cache import SizedLru

    app = create_app(served["index"], served["model"])
    service = app.state.generations.service
    service.thumbnails = SizedLru(40_000)
    client = TestClient(app)
    for item in range(served["index"].count):
        for size in (64, 100, 256, 512):
            assert client.get(f"/images/{item}/thumbnail", params={"size": size}).status_code \
                in (200, 404)
            assert service.thumbnails.held <= 40_000
    made = []
    real = service._small_image
    monkeypatch.setattr(service, "_small_image", lambda *a: made.append(a) or real(*a))
    client.get(f"/images/{served['index'].count - 1}/thumbnail", params={"size": 64})
    assert made == []


def test_the_key_guards_the_api_behind_a_root_path():
    """Behind ``root_path="/ap"`` the path ``/api/search`` routes to the API: the key check
    took ``i/search`` for it and let it through."""
    from cliplab.serve.api_key import ApiKeyCheck

    async def main():
        seen = []

        async def app(scope, receive, send):
            seen.append(scope["path"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        guarded = ApiKeyCheck(app, KEY)
        for root, path, status in (("/ap", "/api/search", 401), ("/app", "/app/api/search", 401),
                                   ("/app", "/app/", 200), ("", "/images/3", 401)):
            sent = []

            async def send(message, sent=sent):
                sent.append(message)

            await guarded({"type": "http", "method": "GET", "path": path, "root_path": root,
                           "headers": [], "query_string": b""}, None, send)
            assert sent[0]["status"] == status, (root, path)

    anyio.run(main)


def test_a_host_with_a_user_part_is_refused(served):
    """``Host: evil.com@localhost`` was read as localhost (URL parsing skips a user part, which
    a Host header never has)."""
    app = create_app(served["index"], served["model"], allowed_hosts=["localhost"])
    client = TestClient(app, base_url="http://localhost")
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/health", headers={"host": "evil.com@localhost"}).status_code == 400


def test_the_api_key_may_come_from_the_environment(served, monkeypatch, capsys):
    """``--api-key`` on a command line shows in ``ps`` to every user of the machine."""
    import uvicorn

    from cliplab.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.setenv("CLIPLAB_API_KEY", KEY)
    assert main(["serve", str(served["root"] / "idx"), "--port", str(free_port())]) == 0
    client = TestClient(started[-1], base_url="http://localhost")
    assert client.get("/api/health").status_code == 401
    assert client.get("/api/health", headers={"X-API-Key": KEY}).status_code == 200
    monkeypatch.setenv("CLIPLAB_API_KEY", "")  # set to nothing: a key was meant, none given
    assert main(["serve", str(served["root"] / "idx"), "--port", str(free_port())]) == 2
    assert len(started) == 1 and capsys.readouterr().err.strip() == (
        "cliplab: error: CLIPLAB_API_KEY is set but empty: give it the key, or unset it to "
        "serve without one")
