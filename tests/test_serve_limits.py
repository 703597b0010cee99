"""The server under hostile input: bounded memory per request, a 4xx for every bad input, artifacts and
settings checked at start-up, nothing of the client's reflected back at length."""

from __future__ import annotations

import gc
import io
import json
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_fuzz import malformed_requests, rss_bytes
from test_serve import PREPROCESSING, change_meta, infer_body, png_bytes, serve, write_artifact

from vitsparse.runtime.artifact import ArtifactError, load_artifact
from vitsparse.runtime.preprocess import MAX_ASPECT_RATIO, Preprocessing, decode_image
from vitsparse.runtime.serve_cli import serve_config
from vitsparse.runtime.server import ServeConfigError

pytestmark = pytest.mark.slow  # starts servers

INFER, CLASSIFY = "/v2/models/tiny/infer", "/v2/models/tiny/classify"


@pytest.fixture
def artifact(tmp_path) -> Path:
    return write_artifact(tmp_path / "tiny")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# --- 1. what a tiny image may cost --------------------------------------------------------------------------

def test_an_extreme_aspect_ratio_is_refused_before_decoding(artifact) -> None:
    """1x4000 is 97 bytes as a PNG; resized to a 224-px shorter side it would be a gigabyte."""
    strip = encoded(Image.new("L", (1, 4000)), "PNG")
    with serve(artifact) as client:
        reply = client.post(CLASSIFY, content=strip)
        assert reply.status_code == 400 and f"longer than {MAX_ASPECT_RATIO}:1" in reply.json()["error"]
        wide = encoded(Image.new("L", (8 * MAX_ASPECT_RATIO, 8)), "PNG")  # at the limit: served
        assert client.post(CLASSIFY, content=wide).status_code == 200


def test_preprocessing_allocates_by_the_models_input_not_by_the_image() -> None:
    prep = Preprocessing.from_meta({**PREPROCESSING, "input_size": [3, 224, 224], "crop_pct": 0.875,
                                    "mean": [0.5] * 3, "std": [0.5] * 3})
    image = Image.new("RGB", (MAX_ASPECT_RATIO * 10, 10))
    tracemalloc.start()
    prep.apply(image)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    resized = MAX_ASPECT_RATIO * 256 * 256 * 3  # the bound: the shorter side at 256, 20 times as long
    assert peak < 8 * resized  # numpy's float copies of the 224x224 crop, not of a 1e9-pixel image


# --- 2. no request's memory outlives its response -----------------------------------------------------------

def test_a_refused_request_leaves_nothing_behind(artifact) -> None:
    """With the collector off, only reference counting frees memory: a cycle through the exception
    would keep every 2 MB body and its parsed list alive. The thread that parsed the last body drops
    it just after handing back its result, so the check waits up to 5 s for that."""
    bad = json.dumps(infer_body(np.zeros((1, 1, 8, 8), np.float32), data=[0.5] * 250_000)).encode()
    with serve(artifact, max_body_bytes=8 * 2**20) as client:
        assert client.post(INFER, content=bad).status_code == 400  # the first one warms the caches
        gc.collect()
        gc.disable()
        try:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(10):
                assert client.post(INFER, content=bad).status_code == 400
            deadline = time.monotonic() + 5
            while (grown := tracemalloc.get_traced_memory()[0] - before) >= len(bad) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            tracemalloc.stop()
            gc.enable()
    assert grown < len(bad), f"{grown:,} bytes held after 10 refused {len(bad):,}-byte requests"


# --- 3. images: a 4xx for every decoder failure, 415 for formats not served --------------------------------

def png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    whole = png_bytes(np.zeros((8, 8)))
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return whole[:33] + chunk + whole[33:]  # after the 8-byte signature and the 25-byte IHDR


@pytest.mark.parametrize("name, body, status, fragment", [
    ("jpeg-cut-in-header", encoded(Image.new("RGB", (8, 8)), "JPEG")[:40], 400, "JPEG"),
    ("ztxt-over-pillows-limit", png_with_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"x" * 2**24)), 400, "PNG"),
    ("itxt-over-pillows-limit", png_with_chunk(b"iTXt", b"k\0\1\0\0\0" + zlib.compress(b"x" * 2**24)), 400,
     "PNG"),
    ("lab-tiff", encoded(Image.new("LAB", (8, 8)), "TIFF"), 415, "TIFF images are not served"),
    ("bmp", encoded(Image.new("RGB", (8, 8)), "BMP"), 415, "BMP images are not served"),
    ("ico", encoded(Image.new("RGB", (16, 16)), "ICO"), 415, "ICO images are not served"),
    ("webp", encoded(Image.new("RGB", (8, 8)), "WEBP"), 415, "WebP images are not served"),
    ("gif", encoded(Image.new("P", (8, 8)), "GIF"), 415, "GIF images are not served"),
])
def test_bad_and_unserved_images_are_named(artifact, name, body, status, fragment) -> None:
    with serve(artifact) as client:
        reply = client.post(CLASSIFY, content=body)
    assert reply.status_code == status and fragment in reply.json()["error"], (name, reply.text)


def test_mutated_pngs_and_jpegs_are_a_400_or_served(artifact) -> None:
    rng = np.random.default_rng(29)
    originals = [png_bytes(rng.integers(0, 256, (16, 16, 3))),
                 encoded(Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)), "JPEG")]
    with serve(artifact) as client:
        for index in range(120):
            data = bytearray(originals[index % 2])
            for position in rng.integers(0, len(data), 1 + index % 4):
                data[position] = rng.integers(0, 256)
            reply = client.post(CLASSIFY, content=bytes(data))
            assert reply.status_code in (200, 400), (index, reply.text)


# --- 4. /infer JSON -------------------------------------------------------------------------------------

def _tensor_json(data: str) -> bytes:
    return ('{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": ' + data
            + "}]}").encode()


@pytest.mark.parametrize("name, body, fragment", [
    ("nested-10000-deep", _tensor_json("[" * 10_000 + "]" * 10_000), "nests too deep"),
    ("integer-past-float", _tensor_json("[1" + "0" * 400 + ", 0" * 63 + "]"), "out-of-range"),
    ("integer-past-4300-digits", _tensor_json("[" + "9" * 5000 + "]"), "not valid JSON"),
    ("output-name-not-a-string", json.dumps({**infer_body(np.zeros((1, 1, 8, 8))),
                                             "outputs": [{"name": [1]}]}).encode(), '"outputs" must be'),
    ("strings-in-data", _tensor_json(json.dumps(["1"] * 64)), "numbers only, got str"),
    ("bools-in-data", _tensor_json(json.dumps([0.5] * 63 + [True])), "numbers only, got bool"),
    ("nulls-in-data", _tensor_json(json.dumps([None] * 64)), "numbers only, got NoneType"),
    ("data-nested-past-its-shape", _tensor_json(json.dumps([[[[[0.5]]]]] * 64)), "nests deeper"),
    ("float-past-fp32", _tensor_json(json.dumps([1e300] * 64)), "out-of-range"),
])
def test_malformed_infer_json_is_a_400(artifact, name, body, fragment) -> None:
    with serve(artifact) as client:
        reply = client.post(INFER, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and fragment in reply.json()["error"], (name, reply.text)


def test_infer_refuses_a_body_declared_as_something_else(artifact) -> None:
    body = json.dumps(infer_body(np.zeros((1, 1, 8, 8), np.float32))).encode()
    with serve(artifact) as client:
        assert client.post(INFER, content=body, headers={"content-type": "text/plain"}).status_code == 415
        for declared in ("application/json", "application/json; charset=utf-8", "application/vnd.x+json"):
            assert client.post(INFER, content=body, headers={"content-type": declared}).status_code == 200
        assert client.post(INFER, content=body).status_code == 200  # undeclared: taken as JSON


# --- 5. top_k ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", ["²", "٣", "1" * 5000, "-1", "0", " 3", "3.0"])
def test_top_k_takes_ascii_digits_only(artifact, top_k) -> None:
    with serve(artifact) as client:
        reply = client.post(CLASSIFY, params={"top_k": top_k}, content=png_bytes(np.zeros((8, 8))))
    assert reply.status_code == 400 and "top_k must be a positive integer" in reply.json()["error"]
    assert len(reply.json()["error"]) < 200


# --- 6. 16-bit images -------------------------------------------------------------------------------------

def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped() -> None:
    deep = encoded(Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)), "PNG")  # 128.0 in 8 bits
    shallow = png_bytes(np.full((8, 8), 128))
    prep = Preprocessing.from_meta(PREPROCESSING)
    np.testing.assert_array_equal(prep.apply(decode_image(deep)), prep.apply(decode_image(shallow)))


# --- 7. settings and meta.json checked at start-up -------------------------------------------------------

@pytest.mark.parametrize("changes, fragment", [
    ({"labels": 10}, "labels must be a list of strings"),
    ({"labels": "zero one"}, "labels must be a list of strings"),
    ({"labels": [{"name": "zero"}] * 10}, "labels must be a list of strings"),
    ({"preprocessing": {**PREPROCESSING, "mean": None}}, "preprocessing lacks mean"),
    ({"preprocessing": {**PREPROCESSING, "input_size": [1, 8.5, 8]}}, "input_size must be a list of whole"),
    ({"preprocessing": {**PREPROCESSING, "input_size": "1x8x8"}}, "input_size must be a list of whole"),
    ({"layers": {"fc": {"shape": "10x64", "nonzero": 3}}}, "layers must map each layer"),
    ({"layers": [1, 2]}, "layers must map each layer"),
])
def test_an_unusable_meta_json_field_stops_the_server_naming_the_file(artifact, changes, fragment) -> None:
    change_meta(artifact, **changes)
    with pytest.raises(ArtifactError, match=fragment) as caught:
        load_artifact(artifact)
    assert "meta.json" in str(caught.value)


def _flags(**changes) -> object:
    """The serve command's own flags and defaults, with `changes` applied."""
    from argparse import ArgumentParser

    from vitsparse.runtime.serve_cli import configure_serve_parser

    parser = ArgumentParser()
    configure_serve_parser(parser)
    args = parser.parse_args(["tiny", "--engine", "onnxruntime"])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("changes, fragment", [
    ({"max_body_mb": float("inf")}, "--max-body-mb"), ({"max_body_mb": float("nan")}, "--max-body-mb"),
    ({"max_body_mb": 0.0}, "--max-body-mb"), ({"graceful_timeout": -1.0}, "--graceful-timeout"),
    ({"graceful_timeout": float("nan")}, "--graceful-timeout"), ({"num_cores": 0}, "num_cores"),
    ({"max_delay_ms": float("nan")}, "max_delay_ms"),
])
def test_bad_flags_are_refused_naming_the_flag(changes, fragment) -> None:
    with pytest.raises(ServeConfigError, match=fragment):
        serve_config(_flags(**changes))


# --- 9. nothing of the client's reflected at length -------------------------------------------------------

def test_no_redirect_from_the_host_header_and_no_long_echo(artifact) -> None:
    with serve(artifact) as client:
        reply = client.get("/v2/models/tiny/", headers={"host": "evil.example"}, follow_redirects=False)
        assert reply.status_code == 404 and "location" not in reply.headers
        long_name = "m" * 8_000
        reply = client.get(f"/v2/models/{long_name}")
        assert reply.status_code == 404 and len(reply.text) < 300 and "tiny" not in reply.text
        reply = client.get("/" + "p" * 8_000)
        assert reply.status_code == 404 and len(reply.text) < 300


# --- multipart uploads -------------------------------------------------------------------------------------

def test_classify_takes_a_multipart_upload_like_curl_f(artifact) -> None:
    image = png_bytes(np.random.default_rng(5).integers(0, 256, (20, 30)))
    with serve(artifact) as client:
        raw = client.post(CLASSIFY, content=image).json()
        for files in ({"file": ("cat.png", image, "image/png")}, {"upload": ("cat.png", image, "image/png")}):
            reply = client.post(CLASSIFY, files=files)
            assert reply.status_code == 200 and reply.json() == raw, reply.text
        reply = client.post(CLASSIFY, files={"a": ("a.png", image), "b": ("b.png", image)})
        assert reply.status_code == 400 and 'form field "file"' in reply.json()["error"]
        reply = client.post(CLASSIFY, content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"})
        assert reply.status_code == 400


# --- the fuzz ---------------------------------------------------------------------------------------------

def test_a_few_hundred_malformed_requests_get_4xx_and_the_server_still_serves(artifact) -> None:
    good = png_bytes(np.full((8, 8), 200))
    with serve(artifact, max_body_bytes=2**20) as client:
        client.post(CLASSIFY, content=good)
        rss_before = rss_bytes()
        for request in malformed_requests(seed=29, count=300):
            reply = client.request(request.method, request.path, content=request.body,
                                   headers=request.headers)
            assert 400 <= reply.status_code < 500 or reply.status_code == 503, (request.kind, reply.text)
            assert reply.json()["error"], request.kind
        assert client.post(CLASSIFY, content=good).status_code == 200
        assert rss_bytes() - rss_before < 100 * 2**20


# --- 8. what the checksum guarantees, and `vitsparse verify` ----------------------------------------------

def test_verify_catches_a_model_onnx_replaced_together_with_its_checksum(tmp_path, capsys) -> None:
    import hashlib

    import onnx
    from onnx import numpy_helper

    from vitsparse.bench.cli import main
    from vitsparse.compiler import Recipe, export_artifact, trace
    from vitsparse.models import build_model

    directory = export_artifact(trace(build_model("digits-vit")), Recipe(base={"model": "digits-vit"}),
                                tmp_path / "digits").directory
    assert main(["verify", str(directory)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    model = onnx.load(str(directory / "model.onnx"))
    largest = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    largest.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(largest)), largest.name))
    onnx.save(model, str(directory / "model.onnx"))
    change_meta(directory, onnx_sha256=hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest())
    load_artifact(directory)  # the checksum alone cannot tell
    assert main(["verify", str(directory)]) == 1
    assert capsys.readouterr().out.startswith("FAILED: ")
    (directory / "weights.safetensors").write_bytes(b"\0" * 64)
    assert main(["verify", str(directory)]) == 2
    assert "weights.safetensors does not match the sha256" in capsys.readouterr().err
