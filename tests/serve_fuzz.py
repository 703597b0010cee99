"""Seeded malformed requests for the server, in-process (the suite) or over HTTP (a deployed server).

Every request generated is wrong in a way the server must answer with a 4xx (or a 503 under load) and
a JSON error: nothing here is a valid request by chance.

    python tests/serve_fuzz.py http://127.0.0.1:8000 MODEL --count 1000 --pid SERVER_PID
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import json
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class FuzzRequest:
    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process, from /proc."""
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * 4096


def _image(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb: the pixels are never there)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + checksum
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _infer_json(rng: np.random.Generator, **changes) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
              "data": rng.standard_normal(64).round(3).tolist()}
    tensor.update(changes)
    return {"id": "fuzz", "inputs": [tensor]}


def _json_requests(rng: np.random.Generator, infer: str) -> list[Callable[[], FuzzRequest]]:
    post = lambda kind, body, **headers: FuzzRequest(kind, "POST", infer, body,  # noqa: E731
                                                     {"content-type": "application/json", **headers})
    text = lambda value: json.dumps(value).encode()  # noqa: E731
    odd = [None, True, "1.5", {"v": 1}, [], "", False]
    return [
        lambda: post("json-truncated", (lambda b: b[:int(rng.integers(1, len(b)))])(text(_infer_json(rng)))),
        lambda: post("json-deep", b"[" * int(rng.integers(1_000, 50_000))),
        lambda: post("json-deep-data", (lambda n: _tensor_with(b"[" * n + b"0.5" + b"]" * n))(
            int(rng.integers(5, 5_000)))),
        lambda: post("json-big-integer", _tensor_with(b"[" + b"9" * int(rng.integers(310, 10_000)) + b"]")),
        lambda: post("json-odd-values", text(_infer_json(rng, data=[odd[int(rng.integers(len(odd)))]] * 64))),
        lambda: post("json-mixed-bool", text(_infer_json(rng, data=[0.5] * 63 + [True]))),
        lambda: post("json-bad-shape", text(_infer_json(rng, shape=rng.integers(-3, 10, int(
            rng.integers(0, 6))).tolist() + ["x"]))),
        lambda: post("json-bad-datatype", text(_infer_json(rng, datatype=["FP64", 7, None][int(
            rng.integers(3))]))),
        lambda: post("json-not-an-object", text([1, "inputs", None][int(rng.integers(3))])),
        lambda: post("json-bad-outputs", text({**_infer_json(rng), "outputs": [
            [{"name": [1]}], "logits", [{"nom": "x"}], [{"name": "x" * 10_000}]][int(rng.integers(4))]})),
        lambda: post("json-not-utf8", b"\xff\xfe" + bytes(rng.integers(0, 256, 64, dtype=np.uint8))),
        lambda: post("json-wrong-content-type", text(_infer_json(rng)), **{"content-type": "text/plain"}),
    ]


def _tensor_with(data: bytes) -> bytes:
    return (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": ' + data
            + b"}]}")


def _image_requests(rng: np.random.Generator, classify: str) -> list[Callable[[], FuzzRequest]]:
    post = lambda kind, body, path=classify, **headers: FuzzRequest(kind, "POST", path, body,  # noqa: E731
                                                                     headers)
    others = ["BMP", "GIF", "TIFF", "WEBP", "ICO"]
    boundary = "fuzzboundary"
    form = {"content-type": f"multipart/form-data; boundary={boundary}"}
    no_file = f"--{boundary}\r\ncontent-disposition: form-data; name=x\r\n\r\n1\r\n--{boundary}--\r\n"
    return [
        lambda: post("image-random-bytes", b"%" + bytes(rng.integers(0, 256, int(rng.integers(1, 4096)),
                                                                     dtype=np.uint8))),
        lambda: post("image-cut-in-header", (lambda b: b[:int(rng.integers(1, 30))])(
            _image(str(rng.choice(["PNG", "JPEG"])), (16, 16)))),
        lambda: post("image-not-served", _image(others[int(rng.integers(len(others)))], (16, 16))),
        lambda: post("image-extreme-aspect", _image("PNG", (1, int(rng.integers(21, 200_000))), "L")),
        lambda: post("image-bomb", png_declaring(int(rng.integers(10_000, 100_000)), 70_000)),
        lambda: post("image-empty", b""),
        lambda: post("top-k-bad", _image("PNG", (8, 8)), path=classify + "?top_k=" + quote(str(rng.choice(
            ["²", "٣", "1" * 5000, "-2", "0", "1e3", "\0"])))),
        lambda: post("multipart-garbage", bytes(rng.integers(0, 256, 512, dtype=np.uint8)), **form),
        lambda: post("multipart-no-file", no_file.encode(), **form),
    ]


def _route_requests(rng: np.random.Generator, model: str) -> list[Callable[[], FuzzRequest]]:
    long = lambda letter, most: letter * int(rng.integers(1, most))  # noqa: E731
    evil_host = {"host": "evil.example"}
    return [
        lambda: FuzzRequest("unknown-model", "POST", f"/v2/models/{long('m', 8_000)}/infer", b"{}"),
        lambda: FuzzRequest("unknown-route", "GET", f"/v2/models/{model}/{long('x', 8_000)}"),
        lambda: FuzzRequest("trailing-slash", "GET", f"/v2/models/{model}/", headers=evil_host),
        lambda: FuzzRequest("wrong-method", "GET", f"/v2/models/{model}/infer"),
    ]


def malformed_requests(seed: int, count: int, model: str = "tiny") -> Iterator[FuzzRequest]:
    """`count` malformed requests of every kind, in a seeded random order."""
    rng = np.random.default_rng(seed)
    infer, classify = f"/v2/models/{model}/infer", f"/v2/models/{model}/classify"
    makers = _json_requests(rng, infer) + _image_requests(rng, classify) + _route_requests(rng, model)
    for _ in range(count):
        yield makers[int(rng.integers(len(makers)))]()


def fire_over_http(url: str, model: str, count: int, seed: int, pid: int | None) -> dict:
    """Send the requests to a running server; the status counts and the server's RSS growth."""
    address = urlsplit(url)
    statuses: collections.Counter = collections.Counter()
    bad: list[str] = []
    rss_before = rss_bytes(pid) if pid else None
    for request in malformed_requests(seed, count, model):
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        connection.request(request.method, request.path, body=request.body, headers=request.headers)
        reply = connection.getresponse()
        body = reply.read()
        connection.close()
        statuses[reply.status] += 1
        if not (400 <= reply.status < 500 or reply.status == 503) or not json.loads(body).get("error"):
            bad.append(f"{request.kind}: {reply.status} {body[:200]!r}")
    return {"statuses": dict(statuses), "unexpected": bad,
            "rss_growth_mb": (rss_bytes(pid) - rss_before) / 2**20 if pid else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pid", type=int, default=None, help="the server's process, to read its RSS")
    args = parser.parse_args(argv)
    report = fire_over_http(args.url, args.model, args.count, args.seed, args.pid)
    print(json.dumps(report, indent=2))
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
