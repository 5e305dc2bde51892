"""Editing over HTTP in embedded mode (issue 22): image-to-image, inpainting, noise in place of a
seed, encodings (with their round trip) and interpolations; every bad input a 4xx with a message,
nothing written to disk, the engine still serving."""

import base64
import io
import os
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servicekit import one_thread, png_pixels, wait_until

from arcdiff.contract import decode_latents, encode_latents
from arcdiff.service.app import create_app
from arcdiff.service.settings import Settings

DIGIT = (np.add.outer(np.arange(8), np.arange(8)) * 16).clip(0, 255).astype(np.uint8)
BOTTOM = np.zeros((8, 8), np.uint8)
BOTTOM[4:] = 255


def png_b64(arr: np.ndarray, mode: str = "L") -> str:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bomb_png(w: int, h: int) -> str:
    """A valid PNG header declaring w x h pixels with almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")  # nothing may be written here (or anywhere) by a bad input
    old = os.getcwd()
    os.chdir(cwd)
    kw = {"model_dir": model_dir, "torch_threads": 1, "max_batch": 8, "redis_url": None, "max_body_bytes": 16384}
    try:
        with one_thread(), TestClient(create_app(Settings(**kw))) as c:
            wait_until(lambda: c.get("/readyz").status_code == 200, 60, "models to load")
            c.cwd = cwd
            yield c
    finally:
        os.chdir(old)


def post(client, path="/v1/generations", **body):
    return client.post(path, json={"model": "tiny", **body})


def test_img2img_and_inpainting_over_http(client):
    r = post(client, steps=8, solver="heun", seed=3, n=2, image=png_b64(DIGIT), strength=0.5, wait=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["kind"], body["strength"], body["nfe"], body["status"]) == ("edit", 0.5, 2 * 4, "finished")
    weak = post(client, steps=8, solver="heun", seed=3, image=png_b64(DIGIT), strength=0.125, wait=True).json()
    far = np.abs(png_pixels(body["images"][0]["png_base64"]).astype(int) - DIGIT).mean()
    near = np.abs(png_pixels(weak["images"][0]["png_base64"]).astype(int) - DIGIT).mean()
    assert near < far  # a weaker edit stays nearer the input
    r = post(client, steps=6, solver="dpmpp2m", seed=4, image=png_b64(DIGIT), mask=png_b64(BOTTOM), wait=True)
    assert r.status_code == 200, r.text
    px = png_pixels(r.json()["images"][0]["png_base64"])
    assert np.array_equal(px[:4], DIGIT[:4])  # the kept (black) half comes back exactly
    assert not np.array_equal(px[4:], DIGIT[4:])


def test_encoding_round_trip_and_noise_as_a_seed(client):
    r = post(client, "/v1/encodings", image=png_b64(DIGIT), steps=6, solver="heun", roundtrip=True)
    assert r.status_code == 200, r.text
    enc = r.json()
    assert (enc["status"], enc["nfe"], enc["shape"], enc["dtype"]) == ("finished", 12, [1, 8, 8], "<f4")
    z = decode_latents(enc["latent_base64"], 1, (1, 8, 8))
    assert np.isfinite(z).all() and z.std() > 0.05
    rt = enc["roundtrip"]
    assert rt is not None and rt["rms_grey"] >= 0 and rt["max_grey"] >= 0
    # the latent as a generation's noise decodes to the round trip's image
    dec = post(client, steps=6, solver="heun", noise=enc["latent_base64"], wait=True).json()
    assert dec["images"][0]["png_base64"] == rt["png_base64"]
    # the encoding is a generation: GET shows its latent
    got = client.get(enc["url"]).json()
    assert got["kind"] == "encode" and got["latents"] == [enc["latent_base64"]]


def test_interpolations_between_seeds_noises_and_images(client):
    r = post(
        client, "/v1/interpolations", start={"seed": 1}, end={"seed": 2}, frames=4, steps=4, solver="ddim", wait=True
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["kind"], body["n"], body["seed"], body["seed_to"]) == ("interpolate", 4, 1, 2)
    ends = [post(client, steps=4, solver="ddim", seed=s, wait=True).json()["images"][0]["png_base64"] for s in (1, 2)]
    assert [body["images"][0]["png_base64"], body["images"][3]["png_base64"]] == ends
    z = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    r = post(
        client, "/v1/interpolations", start={"noise": encode_latents(z[:1])}, end={"noise": encode_latents(z[1:])},
        frames=3, steps=4, wait=True,
    )  # fmt: skip
    assert r.status_code == 200 and len(r.json()["images"]) == 3, r.text
    r = post(
        client, "/v1/interpolations", start={"image": png_b64(DIGIT)}, end={"image": png_b64(255 - DIGIT)},
        frames=3, steps=4, solver="rk4", wait=True,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["nfe"] == 16


RGB = np.zeros((8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/generations", {"image": png_b64(np.zeros((28, 28), np.uint8))}, 422, "takes 8x8 images"),
        ("/v1/generations", {"image": png_b64(RGB, "RGB")}, 422, "mode RGB"),
        ("/v1/generations", {"image": png_b64(DIGIT), "mask": png_b64(np.zeros((4, 4), np.uint8))}, 422, "mask is 4x4"),
        ("/v1/generations", {"image": png_b64(DIGIT), "strength": 0}, 422, "strength"),
        ("/v1/generations", {"image": png_b64(DIGIT), "strength": 1.5}, 422, "strength"),
        ("/v1/generations", {"strength": 0.5}, 422, "strength applies only"),
        ("/v1/generations", {"mask": png_b64(BOTTOM)}, 422, "mask applies only"),
        ("/v1/generations", {"image": bomb_png(100000, 100000)}, 422, "100000x100000"),
        ("/v1/generations", {"image": bomb_png(20000, 20000)}, 422, "image"),
        ("/v1/generations", {"image": base64.b64encode(b"GIF89a" + b"\0" * 40).decode()}, 422, "not a PNG"),
        ("/v1/generations", {"image": "not base64!"}, 422, "base64"),
        ("/v1/generations", {"image": png_b64(DIGIT)[:60]}, 422, "not a readable PNG"),
        ("/v1/generations", {"noise": base64.b64encode(b"\0" * 8).decode()}, 422, "256 bytes"),
        ("/v1/generations", {"image": png_b64(DIGIT), "noise": encode_latents(np.zeros((1, 1, 8, 8)))}, 422, "noise"),
        ("/v1/generations", {"image": "A" * 20000}, 413, "larger than"),
        ("/v1/encodings", {"image": png_b64(DIGIT), "solver": "dpmpp2m"}, 422, "solver"),
        ("/v1/encodings", {"image": png_b64(np.zeros((9, 8), np.uint8))}, 422, "takes 8x8"),
        ("/v1/interpolations", {"start": {"seed": 1}, "end": {"noise": "AAAA"}}, 422, "one kind"),
        ("/v1/interpolations", {"start": {"seed": 1, "noise": "AAAA"}, "end": {"seed": 2}}, 422, "exactly one"),
        ("/v1/interpolations", {"start": {"seed": 1}, "end": {"seed": 2}, "solver": "ddpm"}, 422, "stochastic"),
        ("/v1/interpolations", {"start": {"seed": 1}, "end": {"seed": 2}, "frames": 1}, 422, "frames"),
    ],
)
def test_bad_input_is_a_4xx_with_a_message(client, path, body, status, words):
    r = post(client, path, **body)
    assert r.status_code == status, r.text
    assert words in r.json()["message"], r.json()["message"]
    assert list(client.cwd.iterdir()) == []  # nothing written
    # the engine is unharmed: a generation still runs
    assert post(client, steps=2, solver="ddim", seed=1, wait=True).json()["status"] == "finished"


def test_openapi_lists_the_new_fields_and_routes(client):
    doc = client.get("/openapi.json").json()
    assert {"/v1/encodings", "/v1/interpolations"} <= set(doc["paths"])
    props = doc["components"]["schemas"]["GenerationRequest"]["properties"]
    assert {"image", "strength", "mask", "noise"} <= set(props)
