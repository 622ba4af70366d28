"""A hostile-input corpus: every request is a 4xx with the one JSON error shape; the server stays healthy."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.photos import bomb_png
from tests.serve.conftest import assert_error_shape

RENDER = "/v1/renders"
EVENTS = "/v1/jobs/" + "e" * 32 + "/events"
J = "application/json"


def corpus() -> list[tuple[str, str, str, dict, tuple[int, ...]]]:
    """(label, method, path, httpx kwargs, allowed statuses)."""
    big_prompt = "a " * 1500  # 3000 characters > 2000
    deep = b"[" * 5000 + b"]" * 5000
    blank = blank_png(6000, 6000)  # a few tens of KB on the wire, 36 Mpixel once decoded
    j = {"content-type": J}
    cases = [
        ("malformed json", "POST", RENDER, {"content": b'{"prompt": "x",', "headers": {"content-type": J}}, (422,)),
        ("json not an object", "POST", RENDER, {"json": ["prompt", "x"]}, (422,)),
        ("empty body", "POST", RENDER, {"content": b"", "headers": {"content-type": J}}, (422,)),
        ("no prompt", "POST", RENDER, {"json": {"seed": 1}}, (422,)),
        ("empty prompt", "POST", RENDER, {"json": {"prompt": ""}}, (422,)),
        ("prompt wrong type", "POST", RENDER, {"json": {"prompt": 12}}, (422,)),
        ("width wrong type", "POST", RENDER, {"json": {"prompt": "x", "width": "wide"}}, (422,)),
        ("seed as object", "POST", RENDER, {"json": {"prompt": "x", "seed": {"$gt": 1}}}, (422,)),
        ("unknown field", "POST", RENDER, {"json": {"prompt": "x", "nsfw": True}}, (422,)),
        ("huge prompt", "POST", RENDER, {"json": {"prompt": big_prompt}}, (422,)),
        ("huge negative prompt", "POST", RENDER, {"json": {"prompt": "x", "negative_prompt": big_prompt}}, (422,)),
        ("negative width", "POST", RENDER, {"json": {"prompt": "x", "width": -64}}, (422,)),
        ("zero height", "POST", RENDER, {"json": {"prompt": "x", "height": 0}}, (422,)),
        ("enormous size", "POST", RENDER, {"json": {"prompt": "x", "width": 100000, "height": 100000}}, (422,)),
        ("size not a multiple", "POST", RENDER, {"json": {"prompt": "x", "width": 65}}, (422,)),
        ("too many steps", "POST", RENDER, {"json": {"prompt": "x", "steps": 10_000}}, (422,)),
        ("zero steps", "POST", RENDER, {"json": {"prompt": "x", "steps": 0}}, (422,)),
        ("negative seed", "POST", RENDER, {"json": {"prompt": "x", "seed": -1}}, (422,)),
        ("seed overflow", "POST", RENDER, {"json": {"prompt": "x", "seed": 2**80}}, (422,)),
        (
            "nan guidance",
            "POST",
            RENDER,
            {"content": b'{"prompt": "x", "guidance": NaN}', "headers": {"content-type": J}},
            (422,),
        ),
        ("too many images", "POST", RENDER, {"json": {"prompt": "x", "num_images": 1000}}, (422,)),
        ("zero images", "POST", RENDER, {"json": {"prompt": "x", "num_images": 0}}, (422,)),
        ("unknown preset", "POST", RENDER, {"json": {"prompt": "x", "preset": "../../etc/passwd"}}, (404,)),
        ("traversal character", "POST", RENDER, {"json": {"prompt": "x", "character": "../../etc/passwd"}}, (422,)),
        ("unknown character", "POST", RENDER, {"json": {"prompt": "x", "character": "nobody-here"}}, (404,)),
        ("gate without character", "POST", RENDER, {"json": {"prompt": "x", "min_identity_similarity": 0.5}}, (422,)),
        ("attempts without gate", "POST", RENDER, {"json": {"prompt": "x", "max_attempts": 3}}, (422,)),
        (
            "true cfg on sdxl",
            "POST",
            RENDER,
            {"json": {"prompt": "x", "preset": "tiny-sdxl", "true_cfg_scale": 2}},
            (422,),
        ),
        ("bad format param", "POST", RENDER + "?format=gif", {"json": {"prompt": "x"}}, (422,)),
        (
            "xml body",
            "POST",
            RENDER,
            {"content": b"<prompt>x</prompt>", "headers": {"content-type": "application/xml"}},
            (422,),
        ),
        (
            "body over the limit",
            "POST",
            RENDER,
            {"content": b"{" + b" " * (300 * 1024) + b"}", "headers": {"content-type": J}},
            (413,),
        ),
        ("job malformed", "POST", "/v1/jobs", {"content": b"{{", "headers": {"content-type": J}}, (422,)),
        ("job bad size", "POST", "/v1/jobs", {"json": {"prompt": "x", "width": -1}}, (422,)),
        ("job traversal id", "GET", "/v1/jobs/..%2F..%2Fetc%2Fpasswd", {}, (404,)),
        ("job id junk", "GET", "/v1/jobs/' OR 1=1 --", {}, (404,)),
        ("job unknown id", "GET", "/v1/jobs/" + "0" * 32, {}, (404,)),
        ("job events unknown", "GET", "/v1/jobs/" + "f" * 32 + "/events", {}, (404,)),
        ("job image bad index", "GET", "/v1/jobs/" + "0" * 32 + "/images/-1", {}, (404,)),
        ("job image not int", "GET", "/v1/jobs/" + "0" * 32 + "/images/abc", {}, (404, 422)),
        ("character traversal", "GET", "/v1/characters/..%2F..%2Fetc%2Fpasswd", {}, (404, 422)),
        ("character bad id", "GET", "/v1/characters/UPPER$case", {}, (422,)),
        ("character unknown", "GET", "/v1/characters/nobody-here", {}, (404,)),
        ("approve unknown", "POST", "/v1/characters/nobody-here/approve", {}, (404,)),
        ("list bad status", "GET", "/v1/characters?status=deleted", {}, (422,)),
        ("method not allowed", "PUT", RENDER, {"json": {"prompt": "x"}}, (405,)),
        ("unknown route", "GET", "/v2/renders", {}, (404,)),
        ("character not multipart", "POST", "/v1/characters", {"json": {"id": "x"}}, (422,)),
        (
            "multipart garbage",
            "POST",
            "/v1/characters",
            {"content": b"--xx\r\nnot a part\r\n", "headers": {"content-type": "multipart/form-data; boundary=xx"}},
            (400, 422),
        ),
        # numbers are strict: a string or a boolean is not an integer
        ("seed as string", "POST", RENDER, {"json": {"prompt": "x", "seed": "2"}}, (422,)),
        ("seed as true", "POST", RENDER, {"json": {"prompt": "x", "seed": True}}, (422,)),
        ("num_images as string", "POST", RENDER, {"json": {"prompt": "x", "num_images": "2"}}, (422,)),
        ("num_images as float", "POST", RENDER, {"json": {"prompt": "x", "num_images": 2.0}}, (422,)),
        ("width as string", "POST", RENDER, {"json": {"prompt": "x", "width": "64"}}, (422,)),
        ("steps as true", "POST", RENDER, {"json": {"prompt": "x", "steps": True}}, (422,)),
        ("guidance as true", "POST", RENDER, {"json": {"prompt": "x", "guidance": True}}, (422,)),
        (
            "identity_start_step as string",
            "POST",
            RENDER,
            {"json": {"prompt": "x", "identity_start_step": "0"}},
            (422,),
        ),
        ("job seed as string", "POST", "/v1/jobs", {"json": {"prompt": "x", "seed": "2"}}, (422,)),
        # identity fields without a character would be ignored: refused instead (a security review sent these)
        ("method without a character", "POST", RENDER, {"json": {"prompt": "x", "method": "../x"}}, (422,)),
        (
            "identity_start_step without a character",
            "POST",
            RENDER,
            {"json": {"prompt": "x", "identity_start_step": 10**9}},
            (422,),
        ),
        (
            "character_version without a character",
            "POST",
            RENDER,
            {"json": {"prompt": "x", "character_version": 1}},
            (422,),
        ),
        # JSON nested thousands deep (the parser recursed into a 500) and integers past Python's 4,300 digits
        (
            "deep json field",
            "POST",
            RENDER,
            {"content": b'{"prompt": "x", "seed": ' + deep + b"}", "headers": j},
            (422,),
        ),
        ("deep json body", "POST", RENDER, {"content": b"[" * 100_000 + b"]" * 100_000, "headers": j}, (422,)),
        ("deep json job", "POST", "/v1/jobs", {"content": b'{"prompt": ' + deep + b"}", "headers": j}, (422,)),
        (
            "json deeper than 32",
            "POST",
            RENDER,
            {"content": b'{"prompt": "x", "seed": ' + b"[" * 33 + b"]" * 33 + b"}", "headers": j},
            (422,),
        ),
        (
            "huge integer",
            "POST",
            RENDER,
            {"content": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "headers": j},
            (400, 422),
        ),
        ("deep provenance", "POST", "/v1/characters", multipart(provenance="[" * 3000 + "]" * 3000), (422,)),
        ("deep card", "POST", "/v1/characters", multipart(card="[" * 20_000 + "]" * 20_000), (422,)),
        # Last-Event-ID: a Unicode digit ("\xb2" is "²" in the latin-1 HTTP headers are read as), past
        # Python's int limit, past SQL's 64-bit integers, negative
        ("last-event-id unicode digit", "GET", EVENTS, {"headers": {"Last-Event-ID": b"\xb2"}}, (400,)),
        ("last-event-id 5000 digits", "GET", EVENTS, {"headers": {"Last-Event-ID": "9" * 5000}}, (400,)),
        ("last-event-id 2**70", "GET", EVENTS, {"headers": {"Last-Event-ID": str(2**70)}}, (400,)),
        ("last-event-id negative", "GET", EVENTS, {"headers": {"Last-Event-ID": "-1"}}, (400,)),
        ("last-event-id words", "GET", EVENTS, {"headers": {"Last-Event-ID": "latest"}}, (400,)),
        # small uploads that would be huge once decoded: refused from bytes and headers, before any decode
        ("eight blank 6000x6000 pngs", "POST", "/v1/characters", uploads([blank] * 8), (422,)),
        ("144-mpixel header", "POST", "/v1/characters", uploads([bomb_png(12_000, 12_000)]), (413,)),
        (
            "288 mpixel in eight headers",
            "POST",
            "/v1/characters",
            uploads([bomb_png(6000, 6000 - i) for i in range(8)]),
            (413,),
        ),
    ]
    return cases


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def uploads(files: list[bytes]) -> dict:
    """A valid character registration but for its reference files."""
    data = {"id": "hostile-upload", "name": "Hostile", "provenance": '{"kind": "synthetic", "creator": "t"}'}
    return {"data": data, "files": [("references", (f"r{i}.png", f, "image/png")) for i, f in enumerate(files)]}


def multipart(**fields: str) -> dict:
    """A character registration with valid fields but ``fields`` (the references are not looked at first)."""
    data = {"id": "hostile-json", "name": "Hostile", "provenance": '{"kind": "original", "creator": "t"}', **fields}
    return {"data": data, "files": {"references": ("a.png", b"not looked at", "image/png")}}


CASES = corpus()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_a_4xx_with_the_json_shape(http, keys, case):
    label, method, path, kwargs, allowed = case
    headers = {"Authorization": f"Bearer {keys.admin}", **kwargs.pop("headers", {})}
    response = http.request(method, path, headers=headers, **kwargs)
    error = assert_error_shape(response, allowed)
    assert response.headers.get("x-request-id")
    assert "Traceback" not in error["message"]


def test_field_is_named(http, keys):
    headers = {"Authorization": f"Bearer {keys.render}"}
    for body, field in (
        ({"prompt": "x", "width": 100000}, "width"),
        ({"prompt": "x", "steps": 10_000}, "steps"),
        ({"prompt": "x", "width": "wide"}, "width"),
        ({"prompt": "x", "num_images": 1000}, "num_images"),
        ({"prompt": "x", "preset": "nope"}, "preset"),
        ({"prompt": "x", "character": "Not A Slug"}, "character"),
    ):
        error = assert_error_shape(http.post(RENDER, json=body, headers=headers))
        assert error["field"] == field, (body, error)


def test_an_integer_is_still_a_number(http, keys):
    """Strict numbers refuse strings and booleans, not a JSON integer where a float goes."""
    body = {"prompt": "x", "seed": 1, "guidance": 3, "identity_weight": 1}
    response = http.post(RENDER, json=body, headers={"Authorization": f"Bearer {keys.render}"})
    assert response.status_code == 200, response.text[:300]


def test_still_healthy_after_the_corpus(http, keys, renderer_client):
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    assert renderer_client.render(prompt="still alive", seed=1).images[0].png
