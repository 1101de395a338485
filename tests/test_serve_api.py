"""The HTTP API of `cliplab serve` through FastAPI's test client: rankings equal the model's
own similarities, classify equals the zero-shot head, bad input is a JSON 4xx."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.data.shapes import load_shapes  # noqa: E402
from cliplab.errors import ModelError  # noqa: E402
from cliplab.evaluate.zeroshot import zeroshot_classifier  # noqa: E402
from cliplab.models.dual_encoder import DualEncoder  # noqa: E402
from cliplab.serve.app import create_app  # noqa: E402
from cliplab.serve.index import SearchIndex  # noqa: E402
from tests.serve_helpers import (  # noqa: E402
    SHAPES, build, direct_image_embeddings, save_tiny_model, shapes_index)

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    index, model = shapes_index(root)
    client = TestClient(create_app(index, model, max_upload_bytes=200_000))
    data = load_shapes(n=40, seed=3, kinds=["single"], image_size=32)
    return {"client": client, "model": model, "index": index, "data": data, "root": root,
            "embeddings": direct_image_embeddings(model, data.images)}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _error(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_text_search_ranks_by_the_models_own_similarity(served):
    model, emb = served["model"], served["embeddings"]
    query = "a red circle"
    sims = (model.encode_texts([query]).numpy() @ emb.T)[0]
    order = np.argsort(-sims)
    body = served["client"].get("/api/search", params={"q": query, "k": 10}).json()
    assert [r["id"] for r in body["results"]] == order[:10].tolist()
    assert [r["score"] for r in body["results"]] == pytest.approx(sims[order[:10]].tolist(),
                                                                  abs=1e-4)
    first = body["results"][0]
    assert first["caption"] == served["data"].captions[first["id"]][0]
    assert first["image"] == f"/images/{first['id']}" and body["total"] == 40
    page = served["client"].get("/api/search", params={"q": query, "k": 4, "offset": 6}).json()
    assert [r["id"] for r in page["results"]] == order[6:10].tolist()
    tail = served["client"].get("/api/search", params={"q": query, "k": 10, "offset": 35}).json()
    assert [r["id"] for r in tail["results"]] == order[35:].tolist()


def test_image_search_finds_the_image_itself_first(served):
    array = served["data"].images[11].numpy()
    response = served["client"].post("/api/search/image", params={"k": 5},
                                     files={"file": ("x.png", _png(array), "image/png")})
    results = response.json()["results"]
    assert results[0]["id"] == 11 and results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    sims = served["embeddings"] @ served["embeddings"][11]
    assert [r["id"] for r in results] == np.argsort(-sims)[:5].tolist()


def test_image_search_takes_k_and_offset_as_form_fields(served):
    array, client = served["data"].images[11].numpy(), served["client"]
    order = np.argsort(-(served["embeddings"] @ served["embeddings"][11])).tolist()
    upload = {"file": ("x.png", _png(array), "image/png")}
    body = client.post("/api/search/image", data={"k": "3", "offset": "2"}, files=upload).json()
    assert (body["k"], body["offset"]) == (3, 2)
    assert [r["id"] for r in body["results"]] == order[2:5]
    _error(client.post("/api/search/image", data={"k": "0"}, files=upload), 422,
           "k: expected greater than or equal to 1")
    # two files: the last was searched without a word
    other = ("y.png", _png(served["data"].images[3].numpy()), "image/png")
    _error(client.post("/api/search/image", files=[("file", upload["file"]), ("file", other)]),
           422, "file: give one image per request (the request holds several)")


def test_classify_equals_the_zero_shot_head(served):
    model, labels = served["model"], ["red circle", "blue square", "green triangle"]
    head = zeroshot_classifier(model, labels, ["a photo of a {}."])
    image = torch.from_numpy(served["embeddings"][5:6])
    expected = torch.softmax(model.logit_scale.exp() * image @ head.T, dim=-1)[0].tolist()
    by_id = served["client"].post("/api/classify", data={"labels": "red circle, blue square\n"
                                                         "green triangle", "id": "5"}).json()
    got = {entry["label"]: entry["probability"] for entry in by_id["labels"]}
    assert [got[name] for name in labels] == pytest.approx(expected, abs=1e-5)
    assert [e["probability"] for e in by_id["labels"]] == \
        pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    upload = served["client"].post(
        "/api/classify", data={"labels": ",".join(labels)},
        files={"file": ("x.png", _png(served["data"].images[5].numpy()), "image/png")}).json()
    # the upload is shrunk to the model's 16 px input by PIL as it is decoded (as files are
    # indexed), the in-memory set by the model's own resize: equal within uint8 rounding
    assert [e["probability"] for e in upload["labels"]] == \
        pytest.approx([e["probability"] for e in by_id["labels"]], abs=1e-3)
    # curl -F labels=red circle -F labels=...: repeated fields add up, each split at commas
    repeated = served["client"].post("/api/classify",
                                     data={"labels": labels[:2] + ["green triangle, red circle"],
                                           "id": "5"}).json()
    assert repeated["labels"] == by_id["labels"]


def test_images_are_the_indexed_files(served):
    response = served["client"].get("/images/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    stored = served["root"] / "idx" / "images" / "3.png"
    assert response.content == stored.read_bytes()


def test_health_and_openapi(served):
    health = served["client"].get("/api/health").json()
    assert health["count"] == 40 and health["backend"] == "faiss"
    assert health["fingerprint"] == served["index"].fingerprint
    paths = served["client"].get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/classify", "/api/classify/ids",
            "/images/{id}", "/api/health"} <= set(paths)
    page = served["client"].get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text


def test_labels_docs_say_every_field_is_split_at_commas(served):
    """The page sends its text box as one field, so every field is split at commas; a label
    in double quotes keeps its commas (as in CSV), which the README and the API schema say."""
    from pathlib import Path

    sent = served["client"].post("/api/classify", data={
        "labels": ["great white shark, white shark", "tench"], "id": "5"}).json()
    assert sorted(e["label"] for e in sent["labels"]) == ["great white shark", "tench",
                                                          "white shark"]
    quoted = served["client"].post("/api/classify", data={
        "labels": ['"red, white and blue",  green', '5" tall'], "id": "5"}).json()
    assert sorted(e["label"] for e in quoted["labels"]) == ['5" tall', "green",
                                                            "red, white and blue"]
    for labels, said in ((['cat, "dog, bird'], "unexpected end of data"),
                         (['"Rock" music, jazz'], "',' expected after '\"'"),
                         (["a" * 140_000 + ", b"], "at most 100 labels of at most 200")):
        # an open quote merged the rest of its line into one label; a line past csv's field
        # limit was a 500
        response = served["client"].post("/api/classify", data={"labels": labels, "id": "5"})
        assert response.status_code == 422 and said in response.json()["error"], response.text
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `POST /api/classify`"))
    schema = served["client"].get("/openapi.json").text
    assert "one per repeated" not in row and "in double quotes keeps its commas" in row
    assert "one per repeated labels" not in schema and "in double quotes keeps its commas" in schema


@pytest.mark.parametrize("params, words", [
    ({"q": "   "}, "empty query"),
    ({}, "q is required"),
    ({"q": "x", "k": 0}, "k: expected greater than or equal to 1"),
    ({"q": "x", "k": 101}, "k: expected less than or equal to 100"),
    ({"q": "x", "k": "many"}, "k: expected a valid integer"),
    ({"q": "x", "offset": -1}, "offset"),
    ({"q": "x", "offset": 10_001}, "offset"),
    ({"q": "x" * 1001}, "q: expected at most 1000 characters, got 1001"),
])
def test_bad_search_queries_are_422(served, params, words):
    _error(served["client"].get("/api/search", params=params), 422, words)


def test_bad_uploads_and_ids_are_4xx(served):
    client = served["client"]
    _error(client.post("/api/search/image", files={"file": ("a.txt", b"hello", "text/plain")}),
           415, "not an image")
    _error(client.post("/api/search/image", files={"file": ("e.png", b"", "image/png")}),
           400, "empty")
    # a JPEG cut short is a JPEG: it was told it was no format cliplab reads
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(jpeg, "JPEG")
    for route, form in (("/api/search/image", {}), ("/api/classify", {"labels": "a, b"})):
        answer = client.post(route, data=form, files={
            "file": ("cut.jpg", jpeg.getvalue()[:len(jpeg.getvalue()) // 2], "image/jpeg")})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"].startswith("file is a JPEG image that cannot be decoded "
                                                 "(image file is truncated")
    _error(client.post("/api/search/image",
                       files={"file": ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png")}),
           413, "over the 0.191 MB limit")
    _error(client.post("/api/search/image"), 422, "file is required")
    _error(client.get("/images/40"), 404, "no indexed image with id 40")
    _error(client.get("/images/-1"), 422, "id: expected greater than or equal to 0")
    _error(client.get("/images/abc"), 422, "id: expected a valid integer")
    for path in ("/images/../idx/meta.sqlite", "/images/..%2F..%2Fetc%2Fpasswd",
                 "/images/3/../../index.json"):
        response = client.get(path)
        assert response.status_code in (404, 422) and "error" in response.json()
    _error(client.post("/api/classify", data={"labels": "one", "id": "1"}), 422, "at least two")
    _error(client.post("/api/classify", data={"labels": "cat, cat", "id": "1"}), 422,
           "at least two different labels")
    _error(client.post("/api/classify", data={"labels": "a,b", "id": "99"}), 404, "id 99")
    _error(client.post("/api/classify", data={"labels": "a,b"}), 422, "exactly one of id")
    _error(client.post("/api/classify", data={"labels": "a,b", "id": "x"}), 422, "id")
    _error(client.get("/api/nothing"), 404, "Not Found")


def test_a_text_field_where_the_file_goes_is_422_saying_what_goes_there(served):
    """`curl -F file=abc` (a text field, not a file) said "file: Value error, Expected
    UploadFile, received: <class 'str'>"."""
    for route, fields in (("/api/search/image", {}), ("/api/classify", {"labels": "a,b"})):
        response = served["client"].post(route, data={**fields, "file": "abc"})
        _error(response, 422, "file: upload an image file (multipart/form-data)")
        assert "UploadFile" not in response.json()["error"]


@pytest.mark.parametrize("route, body, fields, how", [
    ("/api/classify", {"id": 1, "labels": "cat,dog"}, "labels, id, file, template",
     "curl -F file=@IMAGE"),
    ("/api/classify/ids", {"ids": "1,2", "labels": "cat,dog"}, "labels, ids, template",
     "curl -F name=value"),
    ("/api/search/image", {"k": 3}, "file, k, offset", "curl -F file=@IMAGE"),
])
def test_a_json_body_to_a_form_endpoint_is_415_naming_its_form_fields(served, route, body,
                                                                        fields, how):
    """A JSON body was "422 labels: Field required" (FastAPI reads none of it)."""
    response = served["client"].post(route, json=body)
    assert response.status_code == 415, response.text
    assert response.json()["error"] == (
        f"{route} takes multipart/form-data fields ({fields}), not a JSON body; send them as "
        f"form fields ({how})")


def test_a_raw_image_body_is_415_saying_to_send_it_as_the_file_field(served):
    """``curl --data-binary @x.png -H 'Content-Type: image/png'`` was "422 file: Field
    required"."""
    response = served["client"].post("/api/search/image", content=b"\x89PNG....",
                                      headers={"content-type": "image/png"})
    assert response.status_code == 415, response.text
    assert response.json()["error"] == (
        "/api/search/image takes multipart/form-data fields (file, k, offset), not a raw "
        "image/png body; send them as form fields (curl -F file=@IMAGE)")
    form = served["client"].post("/api/search/image", data={"k": "3"})  # a form, no file
    assert form.status_code == 422 and form.json()["error"] == "file is required"


@pytest.mark.parametrize("template", ["a {} and {}", "{} {", "{}}", "a photo", "{{}}", "{x}",
                                      "{.x} {}", "a {0} {}", "a {} {style}"])
def test_a_template_without_exactly_one_label_slot_is_422(served, template):
    response = served["client"].post("/api/classify",
                                     data={"labels": "a,b", "id": "1", "template": template})
    _error(response, 422, "exactly one {}")
    assert repr(template) in response.json()["error"]


def test_a_template_with_c_or_doubled_braces_is_used(served):
    model, labels = served["model"], ["red circle", "blue square"]
    image = torch.from_numpy(served["embeddings"][2:3])
    for template, prompt in (("{c}, {{drawn}}", "{}, {{drawn}}"), ("a {} shape", "a {} shape")):
        head = zeroshot_classifier(model, labels, [prompt])
        expected = torch.softmax(model.logit_scale.exp() * image @ head.T, dim=-1)[0].tolist()
        body = served["client"].post("/api/classify", data={
            "labels": ",".join(labels), "id": "2", "template": template}).json()
        got = {entry["label"]: entry["probability"] for entry in body["labels"]}
        assert [got[name] for name in labels] == pytest.approx(expected, abs=1e-5)


def test_api_key_guards_every_route(served):
    client = TestClient(create_app(served["index"], served["model"], api_key=KEY))
    _error(client.get("/api/search", params={"q": "a red circle"}), 401, "API key")
    _error(client.get("/api/search", params={"q": "a red circle"},
                      headers={"X-API-Key": "wrong"}), 401, "API key")
    _error(client.get("/images/1"), 401, "API key")
    _error(client.get("/api/health"), 401, "API key")
    for route, form in (("/api/classify", {"labels": "a, b", "id": "1"}),
                        ("/api/classify/ids", {"labels": "a, b", "ids": "1,2"}),
                        ("/api/search/image", {})):
        _error(client.post(route, data=form), 401, "API key")
    assert client.post("/api/classify/ids", data={"labels": "a, b", "ids": "1,2"},
                       headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/api/search", params={"q": "a red circle"},
                      headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/images/1", params={"api_key": KEY}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself asks for the key
    # ?api_key= is for image URLs (an <img> cannot send a header) and nowhere else
    _error(client.get("/api/search", params={"q": "a red circle", "api_key": KEY}), 401,
           "?api_key= works in image URLs only")
    _error(client.get("/api/health", params={"api_key": KEY}), 401, "X-API-Key header")
    _error(client.get("/images/1", params={"api_key": "wrong"}), 401, "API key")


def test_another_model_is_refused(served, tmp_path):
    other = DualEncoder.load(save_tiny_model(tmp_path / "other", seed=2))
    with pytest.raises(ModelError, match="built with model"):
        create_app(served["index"], other)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none (PIL reads the size
    from the header before any pixel)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_ids_beyond_sqlite_and_images_beyond_pils_limit_are_4xx(served):
    """Ids too large for SQLite were a 500 (OverflowError); an image over PIL's own bomb limit
    was called 'not an image' (415) rather than too large (413)."""
    client = served["client"]
    _error(client.get("/images/9223372036854775808"), 422, "id: expected less than")
    _error(client.post("/api/classify", data={"labels": "a,b", "id": "99999999999999999999"}),
           422, "id")
    _error(client.post("/api/classify", data={"labels": "a,b", "id": "-1"}), 422, "id")
    _error(client.post("/api/search/image",
                       files={"file": ("huge.png", _png_header(20_000, 20_000), "image/png")}),
           413, "file has 400000000 pixels, over 50000000")
    _error(client.post("/api/search/image",
                       files={"file": ("big.png", _png_header(8_000, 8_000), "image/png")}),
           413, "8000x8000 pixels")


def test_a_label_set_is_encoded_once(served, monkeypatch):
    """The page labels every image shown with one label set: its prompts are encoded on the
    first request only (each request re-encoded them, holding the model lock)."""
    from cliplab.serve import search_service as app_module

    calls = []
    real = app_module.zeroshot_classifier
    monkeypatch.setattr(app_module, "zeroshot_classifier",
                        lambda *a, **kw: calls.append(a[1]) or real(*a, **kw))
    client = TestClient(create_app(served["index"], served["model"]))
    answers = [client.post("/api/classify", data={"labels": "red circle, blue square",
                                                   "id": str(i)}).json() for i in range(4)]
    client.post("/api/classify", data={"labels": "red circle, green star", "id": "0"})
    assert calls == [["red circle", "blue square"], ["red circle", "green star"]]
    assert answers[0] == client.post("/api/classify", data={"labels": "red circle, blue square",
                                                           "id": "0"}).json()


def test_an_image_from_a_shard_cut_short_since_indexing_is_404(tmp_path):
    """The shard shrank after indexing: its image is a 404 naming the cut, not 200 with a few
    bytes (or none)."""
    from cliplab.data.collection import read_range
    from cliplab.data.shards import write_shards

    data = load_shapes(n=10, seed=3, kinds=["single"], image_size=32)
    write_shards(data, tmp_path / "shards", samples_per_shard=10, image_format="png",
                 progress=False)
    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, str(tmp_path / "shards"), tmp_path / "idx")
    client = TestClient(create_app(SearchIndex(tmp_path / "idx"), DualEncoder.load(model_dir)))
    whole = client.get("/images/9")
    assert whole.status_code == 200 and whole.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(whole.content))), data.images[9].numpy())
    # revalidated as a file's image is: the shard changes, the tag does
    tag = whole.headers["etag"]
    assert client.get("/images/9", headers={"If-None-Match": tag}).status_code == 304
    assert client.get("/images/8", headers={"If-None-Match": tag}).status_code == 200
    tar = tmp_path / "shards" / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    _error(client.get("/images/9", headers={"If-None-Match": tag}), 404,
           "cannot be read from its shard")
    with pytest.raises(OSError, match="ends .* bytes into the member"):
        read_range(tar, tar.stat().st_size - 10, 100)


@pytest.mark.parametrize("flags, words", [
    (["--max-upload-mb", "nan"], "--max-upload-mb nan: must be a positive number"),
    (["--max-upload-mb", "inf"], "--max-upload-mb inf: must be a positive number"),
    (["--max-upload-mb", "0"], "--max-upload-mb 0.0: must be a positive number"),
    (["--api-key", ""], "--api-key is empty"),
    (["--api-key", "  "], "--api-key is empty"),
    (["--api-key", " secret "], "--api-key starts or ends with spaces, which no client can send"),
])
def test_serve_refuses_bad_options_in_one_line(served, flags, words, capsys, monkeypatch):
    """An empty key (``--api-key "$KEY"`` with KEY unset) served an open API without the
    warning; nan/inf upload limits were tracebacks."""
    import uvicorn

    from cliplab.cli import main

    def served_anyway(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", served_anyway)

    assert main(["serve", str(served["root"] / "idx"), "--port", "1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliplab: error: ") and "\n" not in err and words in err


def test_siglip_probabilities_are_independent_sigmoids_with_the_bias():
    """/api/classify of a SigLIP model: sigmoid(scale * cos + bias) per label, not a softmax
    (every served fixture is CLIP, so a dropped bias went unseen)."""
    from cliplab.models import build_model
    from cliplab.serve.search_service import zero_shot_probabilities

    model = build_model("tiny-siglip", image_size=16, patch_size=8, width=32, layers=1, heads=2)
    with torch.no_grad():
        model.model.logit_bias.fill_(-3.0)
        model.model.logit_scale.fill_(np.log(8.0))
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(2, 5, generator=generator), dim=-1)
    head = torch.nn.functional.normalize(torch.randn(3, 5, generator=generator), dim=-1)
    expected = 1 / (1 + np.exp(-(8.0 * images.numpy() @ head.numpy().T - 3.0)))
    got = zero_shot_probabilities(model, images, head)
    assert got.numpy() == pytest.approx(expected, abs=1e-6)


def test_a_chunked_upload_over_the_limit_is_413(served):
    """A body sent without Content-Length (chunked) is counted as it arrives."""
    def chunks():
        for _ in range(30):
            yield b"0" * 10_000

    response = served["client"].post(
        "/api/search/image", content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=zz"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    _error(response, 413, "over the 0.191 MB limit")


def test_an_indexed_image_file_deleted_since_indexing_is_404(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, {**SHAPES, "n": 6}, tmp_path / "idx")
    client = TestClient(create_app(SearchIndex(tmp_path / "idx"), DualEncoder.load(model_dir)))
    (tmp_path / "idx" / "images" / "3.png").unlink()
    _error(client.get("/images/3"), 404, "the image file of id 3 is gone")
    assert client.get("/images/2").status_code == 200


def test_an_api_key_header_opens_image_urls_too(served):
    client = TestClient(create_app(served["index"], served["model"], api_key=KEY))
    response = client.get("/images/1", headers={"X-API-Key": KEY})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"


def test_classify_refuses_both_an_id_and_a_file(served):
    upload = {"file": ("x.png", _png(served["data"].images[5].numpy()), "image/png")}
    _error(served["client"].post("/api/classify", data={"labels": "a,b", "id": "5"},
                                 files=upload), 422, "exactly one of id")


@pytest.mark.parametrize("form, words", [
    ({"offset": "-1"}, "offset: expected greater than or equal to 0"),
    ({"offset": "10001"}, "offset: expected less than or equal to 10000"),
    ({"k": "101"}, "k: expected less than or equal to 100"),
])
def test_bad_form_fields_of_an_image_search_are_422(served, form, words):
    upload = {"file": ("x.png", _png(served["data"].images[5].numpy()), "image/png")}
    _error(served["client"].post("/api/search/image", data=form, files=upload), 422, words)


@pytest.mark.parametrize("labels", [",".join(f"l{i}" for i in range(101)), "a, " + "b" * 201])
def test_too_many_or_too_long_labels_are_422(served, labels):
    _error(served["client"].post("/api/classify", data={"labels": labels, "id": "1"}), 422,
           "at most 100 labels of at most 200 characters")


def test_at_the_label_limits_classify_answers(served):
    labels = [f"l{i}" for i in range(99)] + ["b" * 200]
    body = served["client"].post("/api/classify", data={"labels": ",".join(labels),
                                                        "id": "1"}).json()
    assert sorted(e["label"] for e in body["labels"]) == sorted(labels)


def test_results_carry_each_items_key_and_metadata(served):
    body = served["client"].get("/api/search", params={"q": "a blue square", "k": 3}).json()
    rows = served["index"].items([r["id"] for r in body["results"]])
    for result in body["results"]:
        row = rows[result["id"]]
        assert result["key"] == row["key"] and result["meta"] == row["meta"]
        assert result["meta"]["captions"] == served["data"].captions[result["id"]]


def test_health_tells_the_servers_limits(served):
    health = served["client"].get("/api/health").json()
    assert (health["max_k"], health["max_upload_bytes"], health["max_query_chars"]) == \
        (100, 200_000, 1000)
    assert health["index"] == served["index"].record["faiss"]


def test_answers_echo_the_request(served):
    """The page shows what was asked: the stripped query, the upload's name, the classified id
    and the template as sent."""
    client = served["client"]
    assert client.get("/api/search", params={"q": "  a red circle "}).json()["query"] == \
        "a red circle"
    upload = {"file": ("mine.png", _png(served["data"].images[5].numpy()), "image/png")}
    assert client.post("/api/search/image", files=upload).json()["query"] == "mine.png"
    by_id = client.post("/api/classify", data={"labels": "a,b", "id": "5",
                                               "template": "{c}, {{drawn}}"}).json()
    assert (by_id["id"], by_id["template"]) == (5, "{c}, {{drawn}}")
    assert client.post("/api/classify", data={"labels": "a,b"}, files=upload).json()["id"] is None


def test_classify_ids_labels_each_image_as_classify_does(served):
    """One request for several indexed images gives each the labels /api/classify gives it,
    in the order asked (repeats once); ids as one comma list or repeated fields."""
    client, labels = served["client"], "red circle, blue square, green triangle"
    one_by_one = [client.post("/api/classify", data={"labels": labels, "id": str(i),
                                                      "template": "a {} shape"}).json()["labels"]
                  for i in (7, 2, 30)]
    batch = client.post("/api/classify/ids", data={"labels": labels, "ids": "7, 2,30,7",
                                                   "template": "a {} shape"}).json()
    assert batch["template"] == "a {} shape"
    assert [r["id"] for r in batch["results"]] == [7, 2, 30]
    for got, alone in zip(batch["results"], one_by_one):  # one matmul or three: 1e-7 apart
        assert [e["label"] for e in got["labels"]] == [e["label"] for e in alone]
        assert [e["probability"] for e in got["labels"]] == \
            pytest.approx([e["probability"] for e in alone], abs=2e-6)
    repeated = client.post("/api/classify/ids", data={"labels": labels,
                                                      "ids": ["7", "2, 30"],
                                                      "template": "a {} shape"}).json()
    assert repeated == batch


@pytest.mark.parametrize("ids, status, words", [
    ("3, 999, 1000", 404, "no indexed image with ids 999, 1000"),
    ("3, 999", 404, "no indexed image with id 999"),
    ("3, x", 422, "ids: 'x' is not an image id (a whole number from 0)"),
    ("-1", 422, "ids: '-1' is not an image id"),
    ("²", 422, "ids: '²' is not an image id"),
    ("9" * 5000, 422, "is not an image id"),
    (" , ", 422, "ids: give 1 to 100 image ids"),
    (",".join(map(str, range(101))), 422, "ids: give 1 to 100 image ids"),
])
def test_classify_ids_refuses_bad_ids_naming_them(served, ids, status, words):
    _error(served["client"].post("/api/classify/ids", data={"labels": "a, b", "ids": ids}),
           status, words)


def test_serve_without_its_extra_names_the_extra_in_one_line(tmp_path, capsys, monkeypatch):
    """After a set-up of the core only, `cliplab serve` was a 13-line ModuleNotFoundError
    traceback (starlette), where index and curate name their extra."""
    import sys

    from cliplab.cli import main

    for name in ("fastapi", "multipart", "python_multipart"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["serve", str(tmp_path / "idx")]) == 2
    assert capsys.readouterr().err == ("cliplab: error: cliplab serve needs fastapi, "
                                       "python-multipart: pip install 'cliplab[serve]'\n")


def test_an_app_let_go_lets_go_of_its_index_and_model(tmp_path):
    """A process that makes apps (a notebook, tests, a reload after `index --add`) gets each
    one's index and model back once the app is dropped: FastAPI memoises facts about every
    endpoint function process-wide, and routes closing over them kept them all. A closed
    index lets go of its vectors' mapping even while it is still referenced."""
    import gc
    import os
    import weakref

    model_dir = save_tiny_model(tmp_path / "model")
    build(model_dir, SHAPES, tmp_path / "idx")
    index, model = SearchIndex(tmp_path / "idx"), DualEncoder.load(model_dir)
    app = create_app(index, model)
    with TestClient(app) as client:
        assert client.get("/api/search", params={"q": "a red circle"}).status_code == 200
        assert client.get("/images/0/thumbnail").status_code == 200
        assert client.get("/").status_code == 200
    gone = [weakref.ref(index), weakref.ref(model)]
    del app, client, index, model
    gc.collect()
    assert [ref() for ref in gone] == [None, None]

    vectors = str((tmp_path / "idx" / "vectors.npy").resolve())

    def mapped() -> bool:  # open or memory-mapped by this process
        fds = {os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return vectors in fds or vectors in maps.read()

    if os.path.isdir("/proc/self"):  # Linux
        kept = SearchIndex(tmp_path / "idx")
        assert mapped()
        kept.close()
        assert not mapped()
