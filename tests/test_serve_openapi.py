"""`cliplab serve`'s API as a contract for client programs: ``/openapi.json`` describes the
bodies the server really sends (each route's fields, the one error shape, the statuses it
answers, the API key), and HTTP's own rules (Allow, HEAD, WWW-Authenticate) hold."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
jsonschema = pytest.importorskip("jsonschema")
from fastapi.testclient import TestClient  # noqa: E402

from cliplab.serve.app import create_app  # noqa: E402
from tests.serve_helpers import shapes_index  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def app_parts(tmp_path_factory):
    return shapes_index(tmp_path_factory.mktemp("openapi"))


@pytest.fixture(scope="module")
def client(app_parts):
    return TestClient(create_app(*app_parts))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _check(document: dict, path: str, method: str, response) -> None:
    """``response`` is one the schema declares for its status, and its JSON body is valid
    against the schema given there, with no field the schema leaves out."""
    declared = document["paths"][path][method]["responses"]
    assert str(response.status_code) in declared, (path, response.status_code, list(declared))
    schema = declared[str(response.status_code)]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**document, **schema})
    body = response.json()
    validator.validate(body)
    assert_no_undeclared(document, schema, body)


def assert_no_undeclared(document: dict, schema: dict, body) -> None:
    """Every key of ``body`` (and of the objects in it) is a property its schema names."""
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    if isinstance(body, dict) and "properties" in schema:
        assert set(body) <= set(schema["properties"]), (set(body), list(schema["properties"]))
        for name, value in body.items():
            assert_no_undeclared(document, schema["properties"][name], value)
    elif isinstance(body, list) and "items" in schema:
        for value in body:
            assert_no_undeclared(document, schema["items"], value)


def test_every_answer_is_what_the_schema_declares(client):
    """Each route's 200 and its errors against ``/openapi.json``: typed bodies (not a bare
    object), errors as ``{"error": ...}`` (not FastAPI's ``{"detail": [...]}``)."""
    document = client.get("/openapi.json").json()
    labels = {"labels": "red, blue"}
    upload = {"file": ("x.png", _png(), "image/png")}
    cases = [
        ("/api/health", "get", client.get("/api/health")),
        ("/api/search", "get", client.get("/api/search", params={"q": "a red circle"})),
        ("/api/search", "get", client.get("/api/search", params={"q": "x", "k": 0})),
        ("/api/search/similar", "get", client.get("/api/search/similar", params={"id": 3})),
        ("/api/search/similar", "get", client.get("/api/search/similar", params={"id": 99})),
        ("/api/search/image", "post", client.post("/api/search/image", files=upload)),
        ("/api/search/image", "post", client.post(
            "/api/search/image", files={"file": ("e.png", b"", "image/png")})),
        ("/api/search/image", "post", client.post(
            "/api/search/image", files={"file": ("a.txt", b"hello", "text/plain")})),
        ("/api/classify", "post", client.post("/api/classify", data={**labels, "id": "2"})),
        ("/api/classify", "post", client.post("/api/classify", data=labels, files=upload)),
        ("/api/classify", "post", client.post("/api/classify", data={"labels": "a", "id": "2"})),
        ("/api/classify/ids", "post", client.post("/api/classify/ids",
                                                  data={**labels, "ids": "1,2"})),
        ("/api/classify/ids", "post", client.post("/api/classify/ids",
                                                  data={**labels, "ids": "1,99"})),
        ("/images/{id}", "get", client.get("/images/99")),
        ("/images/{id}/thumbnail", "get", client.get("/images/1/thumbnail",
                                                     params={"size": 9})),
    ]
    assert {(path, method) for path, method, _ in cases} == {
        (path, method) for path, operations in document["paths"].items() for method in operations}
    for path, method, response in cases:
        _check(document, path, method, response)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for operations in document["paths"].values():
        for operation in operations.values():
            body = operation["responses"]["200"]["content"]
            assert "$ref" in body.get("application/json", {}).get("schema", {}) or \
                list(body) == ["image/*"], operation["operationId"]


def test_images_are_declared_as_images(client):
    document = client.get("/openapi.json").json()
    for path in ("/images/{id}", "/images/{id}/thumbnail"):
        assert list(document["paths"][path]["get"]["responses"]["200"]["content"]) == ["image/*"]
    assert client.get("/images/1").headers["content-type"] == "image/png"


def test_a_405_names_get_among_the_methods_allowed(client):
    """RFC 9110: ``Allow`` lists what the resource takes (it said HEAD alone where HEAD was
    registered before GET)."""
    for path in ("/api/health", "/images/1", "/images/1/thumbnail", "/api/search"):
        refused = client.post(path)
        assert refused.status_code == 405, path
        assert "GET" in [m.strip() for m in refused.headers["allow"].split(",")], path
        assert refused.json() == {"error": "Method Not Allowed"}


def test_the_page_answers_head(client):
    """An uptime check probes the page with HEAD."""
    head, get = client.head("/"), client.get("/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]


def test_only_the_documented_pages_are_served(client):
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 404


def test_with_a_key_the_schema_asks_for_it_and_a_401_names_its_scheme(app_parts):
    keyed = TestClient(create_app(*app_parts, api_key=KEY))
    refused = keyed.get("/api/health")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "APIKey"
    document = keyed.get("/openapi.json").json()
    assert document["components"]["securitySchemes"] == {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert operation["security"] == [{"ApiKey": []}], path
            assert "401" in operation["responses"], path
    _check(document, "/api/health", "get", refused)
    _check(document, "/api/health", "get", keyed.get("/api/health", headers={"X-API-Key": KEY}))
    # without a key the schema asks for none
    assert "securitySchemes" not in TestClient(create_app(*app_parts)).get(
        "/openapi.json").json()["components"]


def test_classify_refuses_two_uploads(client):
    """The last one was labelled without a word, and the answer (``id: null``) could not say
    which (the image search refused two already)."""
    two = [("file", ("a.png", _png(), "image/png")), ("file", ("b.png", _png(), "image/png"))]
    answer = client.post("/api/classify", data={"labels": "red, blue"}, files=two)
    assert answer.status_code == 422
    assert answer.json() == {"error": "file: give one image per request (the request holds "
                                      "several)"}


def test_health_names_every_limit_a_client_can_meet(client):
    health = client.get("/api/health").json()
    assert {key: health[key] for key in health if key.startswith("max_")} == {
        "max_k": 100, "max_offset": 10_000, "max_query_chars": 1000,
        "max_upload_bytes": 10 << 20, "max_labels": 100, "max_label_chars": 200}
