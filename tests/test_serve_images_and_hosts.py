"""What `cliplab serve` does with images and with where a request comes from: search by an
indexed image's id, thumbnails any browser shows, uploads fitted to the model's input and
decoded outside the model's lock (a few at a time), the Host check on loopback and the
hardening headers."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.models.dual_encoder import DualEncoder  # noqa: E402
from cliplab.serve import image_files  # noqa: E402
from cliplab.serve.app import create_app  # noqa: E402
from cliplab.serve.index import SearchIndex  # noqa: E402
from tests.ports import free_port  # noqa: E402
from tests.serve_helpers import SHAPES, build, save_tiny_model  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An index of a folder of 48 px photos (the model takes 16 px), one of them a TIFF, one
    a 16-bit PNG, and a 300x200 PNG."""
    root = tmp_path_factory.mktemp("photos")
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"photo {i}")
    Image.fromarray(rng.integers(0, 256, (60, 30, 3), dtype=np.uint8)).save(folder / "t.tiff")
    Image.fromarray(np.linspace(0, 65535, 48 * 48).astype(np.uint16).reshape(48, 48)) \
        .save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(folder / "big.png")
    (folder / "big.txt").write_text("a larger png")
    (folder / "t.txt").write_text("a tiff")
    (folder / "deep.txt").write_text("a 16-bit png")
    model_dir = save_tiny_model(root / "model")
    build(model_dir, str(folder), root / "idx")
    model = DualEncoder.load(model_dir)
    index = SearchIndex(root / "idx")
    names = {Path(index.image_source(row)["file"]).name: i
             for i, row in index.items(range(index.count)).items()}
    return {"root": root, "folder": folder, "model": model, "index": index, "ids": names,
            "client": TestClient(create_app(index, model))}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _id(photos, name: str) -> int:
    return photos["ids"][name]


def test_similar_search_ranks_by_the_stored_embedding(photos):
    """No upload: the indexed image's own embedding, the image first with cosine 1; the same
    ranking an upload of its file gives (an upload is fitted to the model's input as files
    are indexed, so their embeddings are equal)."""
    client, index = photos["client"], photos["index"]
    item = _id(photos, "p3.png")
    body = client.get("/api/search/similar", params={"id": item, "k": 5}).json()
    assert body["id"] == item and body["k"] == 5 and body["total"] == index.count
    vector = index.vector(item)
    everything = np.stack([index.vector(i) for i in range(index.count)])
    expected = np.argsort(-(everything @ vector), kind="stable")[:5]
    assert [r["id"] for r in body["results"]] == expected.tolist()
    assert body["results"][0]["id"] == item
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    upload = client.post("/api/search/image", params={"k": 5}, files={
        "file": ("p3.png", (photos["folder"] / "p3.png").read_bytes(), "image/png")}).json()
    assert [r["id"] for r in upload["results"]] == [r["id"] for r in body["results"]]
    assert [r["score"] for r in upload["results"]] == \
        pytest.approx([r["score"] for r in body["results"]], abs=1e-5)
    paged = client.get("/api/search/similar", params={"id": item, "k": 2, "offset": 2}).json()
    assert [r["id"] for r in paged["results"]] == expected[2:4].tolist()


def test_similar_search_refuses_an_unknown_or_bad_id(photos):
    client = photos["client"]
    response = client.get("/api/search/similar", params={"id": 999})
    assert response.status_code == 404 and response.json()["error"] == \
        "no indexed image with id 999"
    response = client.get("/api/search/similar", params={"id": "x"})
    assert response.status_code == 422 and response.json()["error"].startswith("id:")


def test_thumbnails_are_small_and_in_a_format_every_browser_shows(photos):
    """A TIFF (no browser shows it), a 16-bit PNG and a PNG larger than asked come back as
    JPEGs the size asked for, in the image's own aspect and colours; a PNG within the size is
    sent as it is (lossless: a 28 px image stays crisp)."""
    client = photos["client"]
    for name, size, expected in (("t.tiff", 64, (30, 60)), ("big.png", 64, (64, 43)),
                                 ("big.png", 256, (256, 171))):
        response = client.get(f"/images/{_id(photos, name)}/thumbnail", params={"size": size})
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(response.content))
        assert thumb.format == "JPEG" and thumb.size == expected  # shrunk, never enlarged
    small = client.get(f"/images/{_id(photos, 'p2.png')}/thumbnail", params={"size": 64})
    assert small.headers["content-type"] == "image/png"
    assert small.content == (photos["folder"] / "p2.png").read_bytes()
    original = np.asarray(Image.open(photos["folder"] / "t.tiff"), dtype=float)
    thumb = client.get(f"/images/{_id(photos, 't.tiff')}/thumbnail", params={"size": 64})
    shown = np.asarray(Image.open(io.BytesIO(thumb.content)), dtype=float)
    assert np.abs(shown.mean(axis=(0, 1)) - original.mean(axis=(0, 1))).max() < 4
    deep = client.get(f"/images/{_id(photos, 'deep.png')}/thumbnail", params={"size": 64})
    assert deep.headers["content-type"] == "image/jpeg"
    grey = np.asarray(Image.open(io.BytesIO(deep.content)).convert("L"), dtype=float)
    assert grey[0, 0] < 20 and grey[-1, -1] > 235  # scaled from 16 bits, not clipped to white
    for size, words in ((8, "size: expected greater than or equal to 64, got '8'"),
                        (4096, "size: expected less than or equal to 512, got '4096'")):
        response = client.get(f"/images/{_id(photos, 'p1.png')}/thumbnail", params={"size": size})
        assert response.status_code == 422 and response.json()["error"] == words


def test_thumbnail_steps_are_the_power_of_two_at_or_above_the_size():
    """Guards an exact power of two being its own step (64 -> 64, not 128): a larger step would
    make the thumbnail by resampling twice and cost another decode and cache entry."""
    from cliplab.serve.search_service import thumbnail_step

    sizes = (1, 63, 64, 65, 128, 129, 256, 512, 600)
    assert [thumbnail_step(s) for s in sizes] == [64, 64, 64, 128, 128, 256, 256, 512, 512]


@pytest.mark.parametrize("route", ["/images/0/thumbnail", "/images/0"])
def test_an_image_and_its_thumbnail_follow_their_file(photos, tmp_path, route):
    """Revalidated by ETag (304 while the file is the same), never reused unasked; a file
    replaced since is sent anew, a file gone a 404 naming the id."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        Image.new("RGB", (40, 40), colour).save(folder / f"c{i}.png")
    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, str(folder), tmp_path / "idx")
    client = TestClient(create_app(SearchIndex(tmp_path / "idx"), DualEncoder.load(model_dir)))
    first = client.get(route)
    tag = first.headers["etag"]
    assert first.headers["cache-control"] == "private, no-cache"
    again = client.get(route, headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    # as a compressing proxy marks it (weak), in a list, or any: the same (RFC 9110)
    for header in (f"W/{tag}", f'"other", {tag}', "*"):
        assert client.get(route,
                          headers={"If-None-Match": header}).status_code == 304, header
    assert client.get(route,
                      headers={"If-None-Match": '"other"'}).status_code == 200
    index = SearchIndex(tmp_path / "idx")
    path = Path(index.image_source(index.items([0])[0])["file"])
    before = np.asarray(Image.open(io.BytesIO(first.content)))[0, 0]
    Image.new("RGB", (40, 40), (0, 255, 0)).save(path)
    time.sleep(0.01)
    changed = client.get(route, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    after = np.asarray(Image.open(io.BytesIO(changed.content)))[0, 0]
    assert after[1] > 200 and not np.array_equal(before, after)
    # replaced by a file of the same size and modification time (`cp -p`, a restore), moved
    # over it or written in place: still a new thumbnail (the inode or change time differ)
    Image.new("RGB", (40, 40), (255, 0, 0)).save(path, compress_level=0)
    tag = client.get(route).headers["etag"]
    for how, colour in (("moved over", (255, 255, 0)), ("written in place", (0, 255, 255))):
        stat = path.stat()
        Image.new("RGB", (40, 40), colour).save(tmp_path / "new.png", compress_level=0)
        if how == "moved over":
            os.replace(tmp_path / "new.png", path)
        else:
            path.write_bytes((tmp_path / "new.png").read_bytes())
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
        fresh = client.get(route, headers={"If-None-Match": tag})
        assert fresh.status_code == 200 and fresh.headers["etag"] != tag, how
        assert tuple(np.asarray(Image.open(io.BytesIO(fresh.content)))[0, 0]) == colour, how
        tag = fresh.headers["etag"]
    path.unlink()
    gone = client.get(route)
    assert gone.status_code == 404 and gone.json()["error"] == "the image file of id 0 is gone"


def test_stored_images_of_an_index_rebuilt_under_the_server_are_refused(tmp_path,
                                                                         monkeypatch):
    """A built-in source's images are stored in the index folder and were looked up there on
    each request: after the index was rebuilt in place (another seed), a running server sent
    the new index's image 5 under the old index's caption of id 5. Until it has switched to
    the new index (`IndexGenerations`; never here) it answers 503; an --add (which keeps the
    stored images) goes on serving them."""
    from cliplab.serve import index_generation

    monkeypatch.setattr(index_generation, "CHECK_EVERY_S", float("inf"))
    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, SHAPES, tmp_path / "idx")
    client = TestClient(create_app(SearchIndex(tmp_path / "idx"), DualEncoder.load(model_dir)))
    first = client.get("/images/5").content
    build(model_dir, {**SHAPES, "seed": 4}, tmp_path / "idx", add=True)
    assert client.get("/images/5").content == first
    assert client.get("/images/5/thumbnail").status_code == 200
    shutil.rmtree(tmp_path / "idx")
    build(model_dir, {**SHAPES, "seed": 9}, tmp_path / "idx")
    for route in ("/images/5", "/images/5/thumbnail"):
        rebuilt = client.get(route)
        assert rebuilt.status_code == 503, route
        assert rebuilt.json()["error"] == (
            f"the index {(tmp_path / 'idx').resolve()} was rebuilt since this server opened it: "
            "its stored images are the new index's; the server serves that one once it has "
            "loaded it")


def test_images_and_thumbnails_answer_head_and_take_the_key_in_the_url(photos):
    client = TestClient(create_app(photos["index"], photos["model"], api_key=KEY))
    item = _id(photos, "p1.png")
    for path in (f"/images/{item}", f"/images/{item}/thumbnail"):
        assert client.get(path).status_code == 401
        assert client.get(path, params={"api_key": KEY}).status_code == 200
        head = client.head(path, params={"api_key": KEY})
        assert head.status_code == 200 and head.content == b""
    assert client.get("/api/search/similar", params={"id": item}).status_code == 401


def test_an_upload_is_decoded_outside_the_models_lock(photos, monkeypatch):
    """A large upload decoding (seconds for 50 megapixels) held the model's lock in classify:
    every text search waited for it. Now a search runs while an upload still decodes."""
    client = photos["client"]
    decoding, release = threading.Event(), threading.Event()
    decode = image_files._decode

    def slow_decode(data, what):
        decoding.set()
        assert release.wait(30)
        return decode(data, what)

    monkeypatch.setattr(image_files, "_decode", slow_decode)
    upload = (photos["folder"] / "p1.png").read_bytes()
    answers = {}
    for route, form in (("/api/classify", {"labels": "cat, dog"}), ("/api/search/image", {})):
        decoding.clear(), release.clear()
        worker = threading.Thread(target=lambda r=route, f=form: answers.__setitem__(
            r, client.post(r, data=f, files={"file": ("p1.png", upload, "image/png")})))
        worker.start()
        assert decoding.wait(30)
        started = time.monotonic()
        found = client.get("/api/search", params={"q": f"a new query for {route}", "k": 2})
        waited = time.monotonic() - started
        release.set()
        worker.join(30)
        assert found.status_code == 200 and waited < 20  # not held until release
        assert answers[route].status_code == 200


def test_uploads_decode_a_few_at_a_time_and_fit_the_model(photos, monkeypatch):
    running, most = [0], [0]
    lock = threading.Lock()
    decode = image_files._decode

    def counted(data, what):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return decode(data, what)

    monkeypatch.setattr(image_files, "_decode", counted)
    data = _png(Image.new("RGB", (120, 80), (10, 20, 30)))
    model_input = photos["model"].preprocess_config
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        image_files.read_upload(data, "file", model_input))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert most[0] == image_files.DECODES_AT_ONCE == 2
    side = model_input.image_size
    assert len(out) == 6 and all(image.size == (side, side) for image in out)


def test_a_grey_upload_shrunk_before_it_is_tripled_has_the_indexed_pixels(photos):
    """Grey uploads (8-bit, 16-bit, bilevel) are fitted to the model in one channel, then made
    RGB (a third of the memory): the pixels equal RGB-then-fit, as a folder is indexed."""
    from cliplab.data.images import fit_to_model
    from cliplab.models.preprocess import convert_image

    model_input = photos["model"].preprocess_config
    rng = np.random.default_rng(0)
    for array in (rng.integers(0, 256, (61, 83), dtype=np.uint8),
                  rng.integers(0, 65536, (61, 83)).astype(np.uint16),
                  rng.integers(0, 2, (61, 83)).astype(bool)):
        data = _png(Image.fromarray(array))
        got = image_files.read_upload(data, "file", model_input)
        expected = fit_to_model(convert_image(Image.open(io.BytesIO(data))), model_input)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(expected))


def test_on_loopback_only_its_own_names_are_answered(photos):
    """DNS rebinding: a page of another site whose name resolves to 127.0.0.1 sends its own
    name as the Host; it is refused (JSON, as every error), the server's names answered."""
    app = create_app(photos["index"], photos["model"],
                     allowed_hosts=["localhost", "127.0.0.1", "::1", "proxy.lan"])
    client = TestClient(app)
    # the Host header as a browser sends it (a base_url of [::1] trips TestClient before 1.7)
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "proxy.lan"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host
    assert client.get("/api/health", headers={"host": "[::2]:8000"}).status_code == 400
    refused = TestClient(app, base_url="http://attacker.example:8000").get(
        "/api/search", params={"q": "photo"})
    assert refused.status_code == 400
    assert refused.json()["error"] == (
        "Host 'attacker.example:8000' is not a name of this server (127.0.0.1, ::1, "
        "localhost, proxy.lan); to reach it by that name (through a reverse proxy), serve "
        "with --allow-host NAME")
    assert refused.headers["x-frame-options"] == "DENY"


def test_responses_carry_hardening_headers(photos):
    client = photos["client"]
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    for response in (page, client.get("/api/health"), client.get("/images/0"),
                     client.get("/api/search", params={"q": ""})):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
    assert "content-security-policy" not in client.get("/docs").headers  # Swagger UI's CDN


def test_serve_passes_loopback_names_and_refuses_what_no_client_can_send(photos, monkeypatch,
                                                                        capsys, request):
    import uvicorn

    from cliplab.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    monkeypatch.delenv("PILLOW_BLOCK_SIZE", raising=False)
    block_size = Image.core.get_block_size()
    request.addfinalizer(lambda: Image.core.set_block_size(block_size))
    idx = str(photos["root"] / "idx")
    assert main(["serve", idx, "--port", str(free_port()), "--allow-host", "search.lan"]) == 0
    client = TestClient(started[-1], base_url="http://search.lan")
    assert client.get("/api/health").status_code == 200
    assert TestClient(started[-1], base_url="http://evil.test").get("/").status_code == 400
    for flags, words in ((["--api-key", "k€y"], "--api-key holds a character outside "
                                                 "printable ASCII (such as € or é)"),
                         (["--host", "0.0.0.0", "--allow-host", "a.lan"],
                          "--allow-host applies to a loopback --host only; 0.0.0.0 answers "
                          "any name")):
        capsys.readouterr()
        assert main(["serve", idx, "--port", str(free_port()), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cliplab: error: ") and "\n" not in err and words in err
    assert main(["serve", idx, "--port", str(free_port()), "--api-key", "a key with spaces"]) == 0
    # the server's Pillow frees a large decoded image to the system at once (64 MB blocks)
    assert Image.core.get_block_size() == 64 << 20
