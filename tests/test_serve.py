"""runtime/server.py: KServe v2 routes, /classify, /metrics, dynamic batching, bad input, faults, shutdown.

Most tests serve a tiny classifier built with onnx.helper (a linear layer on 8x8 grey images, symbolic
batch), whose logits numpy computes exactly; one serves a real exported digits-vit against torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from serve_fuzz import png_declaring
from starlette.testclient import TestClient

from vitsparse.runtime import ENGINES, engine_status
from vitsparse.runtime.artifact import ArtifactError, load_artifact, parse_artifact_spec
from vitsparse.runtime.dynamic_batcher import DynamicBatcher, QueueFullError
from vitsparse.runtime.metrics import ServerMetrics
from vitsparse.runtime.preprocess import ImageError, ImageTooLargeError, Preprocessing, decode_image
from vitsparse.runtime.server import ServeConfig, ServeConfigError, build_models, create_app

from helpers import BLOCK_TORCH

pytestmark = pytest.mark.slow  # starts servers

AVAILABLE = [name for name in ENGINES if engine_status(name).available]
PREPROCESSING = {"input_size": [1, 8, 8], "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                 "mean": [0.25], "std": [0.5]}
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WEIGHT = np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32)
BIAS = np.linspace(-1, 1, 10, dtype=np.float32)


def logits_of(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), 64) @ WEIGHT + BIAS


def write_artifact(directory: Path, batch: int | str = "batch", **meta_changes) -> Path:
    """model.onnx (Reshape to [B, 64], MatMul, Add) and meta.json as export_artifact writes them."""
    directory.mkdir(parents=True)
    shape_target = np.array([-1 if isinstance(batch, str) else batch, 64], dtype=np.int64)
    nodes = [helper.make_node("Reshape", ["input", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "weight"], ["scores"]),
             helper.make_node("Add", ["scores", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [numpy_helper.from_array(shape_target, "target"), numpy_helper.from_array(WEIGHT, "weight"),
         numpy_helper.from_array(BIAS, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.save(model, str(directory / "model.onnx"))
    digest = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()
    meta = {"batch_size": 1, "dynamic_batch": isinstance(batch, str), "passes": ["magnitude"],
            "macs": 640, "params": 650, "nonzero_params": 650,
            "layers": {"fc": {"shape": [10, 64], "nonzero": 320, "sparsity": 0.5}},
            "preprocessing": PREPROCESSING, "labels": LABELS, "onnx_sha256": digest}
    meta.update(meta_changes)
    (directory / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    return directory


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def preprocessed(data: bytes) -> np.ndarray:
    return Preprocessing.from_meta(PREPROCESSING).apply(decode_image(data))


def serve(directory: Path, **config) -> TestClient:
    config = ServeConfig(**{"engine": "onnxruntime", **config})
    metrics = ServerMetrics()
    return TestClient(create_app(build_models([load_artifact(directory)], config, metrics), config, metrics))


def infer_body(x: np.ndarray, **changes) -> dict:
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}
    tensor.update(changes)
    return {"id": "req-1", "inputs": [tensor]}


@pytest.fixture
def artifact(tmp_path) -> Path:
    return write_artifact(tmp_path / "tiny")


# --- preprocessing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    {"input_size": (1, 8, 8), "interpolation": "bilinear", "crop_pct": 1.0, "mean": (0.3,), "std": (0.4,)},
    {"input_size": (3, 160, 160), "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "squash",
     "mean": (0.5,) * 3, "std": (0.5,) * 3},
], ids=["deit-bicubic-0.9", "digits-grey", "squash"])
def test_preprocessing_is_timms_eval_transform_pixel_for_pixel(cfg) -> None:
    from timm.data import create_transform

    rng = np.random.default_rng(1)
    for width, height in [(300, 200), (123, 457), (224, 224), (8, 8), (31, 17)]:
        data = png_bytes(rng.integers(0, 256, (height, width, 3)))
        ours = Preprocessing.from_meta(cfg).apply(decode_image(data))
        mode = "L" if cfg["input_size"][0] == 1 else "RGB"
        expected = create_transform(**cfg)(Image.open(io.BytesIO(data)).convert(mode)).numpy()
        np.testing.assert_array_equal(ours, expected)


def test_decoding_refuses_non_images_truncated_files_and_bombs() -> None:
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"GIF? no, just text")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    whole = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(whole[: len(whole) // 2])
    with pytest.raises(ImageTooLargeError, match="declares 8000x8000 pixels, over the limit of 40,000,000"):
        decode_image(png_declaring(8000, 8000))
    with pytest.raises(ImageTooLargeError, match="too many pixels to decode"):  # Pillow's own bomb check
        decode_image(png_declaring(60_000, 60_000))
    with pytest.raises(ImageTooLargeError, match="over the limit of 100"):
        decode_image(whole, max_pixels=100)


def test_unusable_preprocessing_is_named() -> None:
    with pytest.raises(ValueError, match="lacks interpolation"):
        Preprocessing.from_meta({k: v for k, v in PREPROCESSING.items() if k != "interpolation"})
    with pytest.raises(ValueError, match="crop_mode 'border' is not supported"):
        Preprocessing.from_meta({**PREPROCESSING, "crop_mode": "border"})
    with pytest.raises(ValueError, match="mean and std need 1"):
        Preprocessing.from_meta({**PREPROCESSING, "mean": [0.1, 0.2, 0.3]})


# --- the routes ---------------------------------------------------------------------------------------------

def test_infer_matches_numpy_at_every_request_size(artifact) -> None:
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8)).astype(np.float32)
    with serve(artifact, batch_sizes=(1, 4)) as client:
        for rows in (1, 3, 4):  # 3 is padded to the compiled batch 4 and cut back
            reply = client.post("/v2/models/tiny/infer", json=infer_body(np.resize(x, (rows, 1, 8, 8))))
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["id"] == "req-1" and body["model_name"] == "tiny"
            (output,) = body["outputs"]
            assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [rows, 10])
            got = np.asarray(output["data"], dtype=np.float32).reshape(rows, 10)
            np.testing.assert_allclose(got, logits_of(np.resize(x, (rows, 1, 8, 8))), rtol=1e-5, atol=1e-5)


def test_classify_returns_top_k_labels_with_probabilities(artifact) -> None:
    data = png_bytes(np.random.default_rng(3).integers(0, 256, (20, 30)))
    with serve(artifact) as client:
        reply = client.post("/v2/models/tiny/classify?top_k=3", content=data,
                            headers={"content-type": "image/png"})
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    scores = logits_of(preprocessed(data)[None])[0]
    probabilities = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    best = np.argsort(-probabilities)[:3]
    assert [p["index"] for p in predictions] == best.tolist()
    assert [p["label"] for p in predictions] == [LABELS[i] for i in best]
    np.testing.assert_allclose([p["probability"] for p in predictions], probabilities[best], rtol=1e-4)


def test_health_metadata_and_metrics(artifact) -> None:
    with serve(artifact, batch_sizes=(1, 2)) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        meta = client.get("/v2/models/tiny").json()
        client.post("/v2/models/tiny/classify", content=b"not an image")
        text = client.get("/metrics").text
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    params = meta["parameters"]
    assert params["batch_sizes"] == [1, 2] and params["labels"] == 10
    assert params["sparsity"]["layer_sparsity"] == 0.5 and params["sparsity"]["passes"] == ["magnitude"]
    assert params["preprocessing"]["interpolation"] == "bilinear"
    assert 'vitsparse_requests_total{route="/v2/models/{name}",status="200"} 1' in text
    labels = 'error="bad_image",route="/v2/models/{name}/classify",status="400"'
    assert f"vitsparse_request_errors_total{{{labels}}} 1" in text
    assert 'vitsparse_request_duration_seconds_bucket{route="/v2/health/live",le="+Inf"} 1' in text
    assert 'vitsparse_queue_depth{model="tiny"} 0' in text and "# TYPE vitsparse_batch_size histogram" in text


def bad_requests(limit: int) -> list:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    whole = png_bytes(np.random.default_rng(4).integers(0, 256, (64, 64)))
    infer, classify = "/v2/models/tiny/infer", "/v2/models/tiny/classify"
    return [
        (classify, b"%PDF-1.4 not an image", 400, "not an image"),
        (classify, whole[: len(whole) // 2], 400, "truncated or corrupt"),
        (classify, png_declaring(8000, 8000), 413, "declares 8000x8000 pixels"),
        (classify, png_declaring(50_000, 50_000), 413, "too many pixels"),
        (classify, b"\xff" * (limit + 1), 413, "over the limit"),
        ("/v2/models/nope/classify", whole, 404, "unknown model 'nope'"),
        (classify + "?top_k=zero", whole, 400, "top_k must be a positive integer"),
        (infer, b"{not json", 400, "not valid JSON"),
        (infer, json.dumps({"inputs": "x"}).encode(), 400, '"inputs" list'),
        (infer, json.dumps(infer_body(np.zeros((1, 1, 8, 9), np.float32))).encode(), 400,
         "must have shape [n, 1, 8, 8]"),
        (infer, json.dumps(infer_body(x, datatype="INT64")).encode(), 400, "has datatype FP32, got 'INT64'"),
        (infer, json.dumps(infer_body(x, data=[1.0] * 10)).encode(), 400, "needs 64 values, got 10"),
        (infer, json.dumps(infer_body(x, data=["a"] * 64)).encode(), 400, "data must hold numbers only"),
        (infer, json.dumps(infer_body(np.zeros((9, 1, 8, 8), np.float32))).encode(), 400, "1 <= n <= 2"),
        (infer, json.dumps(infer_body(x, name="pixels")).encode(), 400, "unknown input 'pixels'"),
        (infer, json.dumps({**infer_body(x), "outputs": [{"name": "probs"}]}).encode(), 400,
         "unknown output(s) ['probs']"),
        ("/v2/models/tiny/explain", b"{}", 404, "Not Found"),
    ]


def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(artifact) -> None:
    limit = 4096
    good = png_bytes(np.full((8, 8), 200))
    with serve(artifact, batch_sizes=(1, 2), max_body_bytes=limit) as client:
        for route, body, status, fragment in bad_requests(limit):
            reply = client.post(route, content=body)
            assert reply.status_code == status, (route, reply.text)
            assert fragment in reply.json()["error"], (route, reply.json())
            assert client.post("/v2/models/tiny/classify", content=good).status_code == 200


def test_a_failing_engine_is_a_500_and_the_next_request_succeeds(artifact) -> None:
    image = png_bytes(np.zeros((8, 8)))
    with serve(artifact) as client:
        engine = client.app.state.models["tiny"].engines[1]
        real_run = engine.run
        engine.run = lambda inputs: (_ for _ in ()).throw(RuntimeError("engine crashed"))
        reply = client.post("/v2/models/tiny/classify", content=image)
        assert reply.status_code == 500 and "internal server error" in reply.json()["error"]
        engine.run = real_run
        assert client.post("/v2/models/tiny/classify", content=image).status_code == 200


# --- batching and back-pressure -----------------------------------------------------------------------------

class RecordingEngine:
    """Stands in for an Engine: doubles its input, records each call's batch, can be held at a gate."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.gate = gate

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(len(inputs[0]))
        return [inputs[0] * 2]


def test_batcher_gathers_pads_and_splits_back() -> None:
    engines = {1: RecordingEngine(), 4: RecordingEngine()}

    async def scenario() -> list[list[np.ndarray]]:
        batcher = DynamicBatcher(engines, max_delay=0.05, max_queue=16)
        batcher.start()
        sizes = [1, 2, 1, 1, 4, 3]
        requests = [np.full((n, 2), float(i), dtype=np.float32) for i, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.close()
        return requests, results

    requests, results = asyncio.run(scenario())
    for request, (output,) in zip(requests, results, strict=True):
        np.testing.assert_array_equal(output, request * 2)
    # [1, 2, 1] fill the batch of 4; [1] runs alone at batch 1 (4 more would not fit); [4]; [3] padded to 4
    assert engines[4].calls == [4, 4, 4] and engines[1].calls == [1]


def test_batcher_runs_as_many_batches_at_once_as_it_has_streams() -> None:
    meeting = threading.Barrier(2, timeout=10)  # breaks unless two engine calls overlap

    class MeetingEngine(RecordingEngine):
        def run(self, inputs):
            meeting.wait()
            return super().run(inputs)

    async def scenario() -> list:
        batcher = DynamicBatcher({1: MeetingEngine()}, max_delay=0.0, max_queue=4, streams=2)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(np.ones((1, 1), np.float32)) for _ in range(2)))
        await batcher.close()
        return results

    assert [output[0].tolist() for output in asyncio.run(scenario())] == [[[2.0]], [[2.0]]]


def test_batcher_refuses_what_would_overflow_its_queue() -> None:
    gate = threading.Event()

    async def scenario() -> None:
        batcher = DynamicBatcher({2: RecordingEngine(gate)}, max_delay=0.0, max_queue=3)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit(np.zeros((2, 1), np.float32)))
        await asyncio.sleep(0.05)  # the worker holds that batch at the gate; the queue is empty again
        queued = [asyncio.ensure_future(batcher.submit(np.zeros((1, 1), np.float32))) for _ in range(3)]
        await asyncio.sleep(0)
        assert batcher.queue_depth == 3
        with pytest.raises(QueueFullError, match="3 of 3 items"):
            await batcher.submit(np.zeros((1, 1), np.float32))
        with pytest.raises(ValueError, match="1 to 2 items"):
            await batcher.submit(np.zeros((3, 1), np.float32))
        gate.set()
        await asyncio.gather(running, *queued)
        await batcher.close()

    asyncio.run(scenario())


def test_a_full_queue_is_a_503_with_retry_after(artifact) -> None:
    gate = threading.Event()
    image = png_bytes(np.zeros((8, 8)))
    with serve(artifact, batch_sizes=(1,), max_queue=2, max_delay_ms=0) as client:
        engine = client.app.state.models["tiny"].engines[1]
        real_run = engine.run
        engine.run = lambda inputs: (gate.wait(10), real_run(inputs))[1]
        with ThreadPoolExecutor(4) as pool:
            first = [pool.submit(client.post, "/v2/models/tiny/classify", content=image) for _ in range(3)]
            deadline = time.monotonic() + 10
            while client.app.state.models["tiny"].batcher.queue_depth < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # one request at the engine's gate, two queued
            refused = client.post("/v2/models/tiny/classify", content=image)
            gate.set()
            answered = [future.result().status_code for future in first]
        metrics = client.get("/metrics").text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "at capacity" in refused.json()["error"]
    assert answered == [200, 200, 200]
    assert 'error="queue_full"' in metrics


# --- artifacts and settings a server must refuse ----------------------------------------------------------

def corrupt(directory: Path) -> None:
    data = bytearray((directory / "model.onnx").read_bytes())
    data[-20:] = b"\0" * 20
    (directory / "model.onnx").write_bytes(bytes(data))


def change_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / "meta.json").read_text())
    meta.update(changes)
    (directory / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def not_onnx(directory: Path) -> None:
    (directory / "model.onnx").write_bytes(b"these bytes are no protobuf")
    change_meta(directory, onnx_sha256=hashlib.sha256(b"these bytes are no protobuf").hexdigest())


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "meta.json").unlink(), "not a complete artifact: meta.json missing"),
    (lambda d: (d / "model.onnx").unlink(), "not a complete artifact: model.onnx missing"),
    (lambda d: (d / "meta.json").write_text("{oops"), "meta.json is not readable JSON"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), "must hold a JSON object"),
    (corrupt, "does not match the sha256 meta.json recorded"),
    (lambda d: change_meta(d, onnx_sha256=None), "onnx_sha256 is missing"),
    (lambda d: change_meta(d, onnx_sha256="0" * 63), "not a sha256 hex digest"),
    (not_onnx, "not a valid ONNX model"),
    (lambda d: change_meta(d, preprocessing=None), "preprocessing lacks input_size"),
    (lambda d: change_meta(d, preprocessing={**PREPROCESSING, "crop_pct": 2.0}), "crop_pct must lie in"),
], ids=["no-meta", "no-onnx", "bad-json", "not-object", "checksum", "no-digest", "bad-digest", "not-onnx",
        "no-preprocessing", "bad-preprocessing"])
def test_broken_artifacts_are_refused_with_the_reason(artifact, damage, message) -> None:
    damage(artifact)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact)


def test_missing_paths_names_and_settings_are_clear(artifact, tmp_path) -> None:
    with pytest.raises(ArtifactError, match="artifact directory not found"):
        load_artifact(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="is a file"):
        load_artifact(artifact / "model.onnx")
    with pytest.raises(ArtifactError, match="model name 'a b'"):
        load_artifact(artifact, "a b")
    assert parse_artifact_spec(f"deit={artifact}") == ("deit", artifact)
    assert parse_artifact_spec(str(artifact)) == (None, artifact)
    with pytest.raises(ArtifactError, match="two artifacts are named tiny"):
        build_models([load_artifact(artifact)] * 2, ServeConfig(), ServerMetrics())
    for bad, message in [({"batch_sizes": (0,)}, "positive integers"), ({"batch_sizes": (2, 2)}, "repeat"),
                         ({"max_delay_ms": -1.0}, "max_delay_ms must be >= 0"),
                         ({"batch_sizes": (1, 16), "max_queue": 8}, "below the largest batch size")]:
        with pytest.raises(ServeConfigError, match=message):
            ServeConfig(**bad)


def test_a_file_with_its_batch_baked_in_says_how_to_serve_batches(tmp_path) -> None:
    baked = load_artifact(write_artifact(tmp_path / "baked", batch=1))
    with pytest.raises(ArtifactError, match=r"exported at batch 1 and cannot run at batch 4; export it with "
                                            r"ExportConfig\(dynamic_batch=True\)"):
        build_models([baked], ServeConfig(batch_sizes=(1, 4)), ServerMetrics())
    assert len(build_models([baked], ServeConfig(batch_sizes=(1,)), ServerMetrics())) == 1


def test_serve_command_refuses_a_bad_artifact_in_one_line(tmp_path, capsys) -> None:
    from vitsparse.bench.cli import main

    assert main(["serve", str(tmp_path / "missing"), "--engine", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitsparse serve: error: artifact directory not found") and "\n" not in err


# --- a real server process: torch-free, drains on SIGTERM ---------------------------------------------------

SERVE_WITHOUT_TORCH = BLOCK_TORCH + """
from vitsparse.runtime.__main__ import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


def test_sigterm_finishes_requests_in_flight_then_exits(artifact) -> None:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", SERVE_WITHOUT_TORCH, "serve", str(artifact), "--engine", "onnxruntime",
               "--port", str(port), "--batch-sizes", "1,4", "--max-delay-ms", "1500",
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    try:
        wait_ready(url, process)
        image = png_bytes(np.full((8, 8), 90))
        with ThreadPoolExecutor(1) as pool:  # waits 1.5 s for a batch that never fills: in flight at SIGTERM
            in_flight = pool.submit(httpx.post, f"{url}/v2/models/tiny/classify", content=image, timeout=30)
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            reply = in_flight.result()
        assert process.wait(timeout=30) == 0, process.communicate()[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert reply.status_code == 200 and reply.json()["predictions"][0]["label"] in LABELS
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/v2/health/live", timeout=2)


# --- a real exported model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", AVAILABLE)
def test_exported_digits_vit_serves_what_torch_computes(tmp_path, engine) -> None:
    import torch
    from sklearn.datasets import load_digits

    from vitsparse.compiler import ExportConfig, Recipe, export_artifact, trace
    from vitsparse.models.digits import DigitsViTConfig, build_digits_architecture

    model = build_digits_architecture(DigitsViTConfig()).eval()
    recipe = Recipe(base={"model": "digits-vit", "kwargs": {}})
    result = export_artifact(trace(model), recipe, tmp_path / "dv", ExportConfig(dynamic_batch=True))
    meta = result.meta
    assert meta["labels"] == [str(d) for d in range(10)] and meta["preprocessing"]["input_size"] == [1, 8, 8]
    assert meta["dynamic_batch"] and len(meta["onnx_sha256"]) == 64
    digits = load_digits()
    images = [png_bytes(digits.images[i] * 255 / 16) for i in range(6)]
    prep = Preprocessing.from_meta(meta["preprocessing"])
    with serve(tmp_path / "dv", engine=engine, batch_sizes=(1, 4)) as client:
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda data: client.post("/v2/models/dv/classify?top_k=10", content=data),
                                    images))
    for data, reply in zip(images, replies, strict=True):
        assert reply.status_code == 200, reply.text
        with torch.no_grad():
            logits = model(torch.from_numpy(prep.apply(decode_image(data))[None]))[0]
        expected = torch.softmax(logits.double(), 0).numpy()
        got = {int(p["label"]): p["probability"] for p in reply.json()["predictions"]}
        np.testing.assert_allclose([got[d] for d in range(10)], expected, atol=1e-4)


def test_the_asgi_module_builds_its_app_from_the_environment(artifact) -> None:
    from vitsparse.runtime import asgi

    app = asgi.app_from_environment({"VITSPARSE_ARTIFACTS": f"digits={artifact}",
                                     "VITSPARSE_ENGINE": "onnxruntime", "VITSPARSE_BATCH_SIZES": "1,2"})
    with TestClient(app) as client:
        assert client.get("/v2/models/digits").json()["parameters"]["batch_sizes"] == [1, 2]
    with pytest.raises(ArtifactError, match="set VITSPARSE_ARTIFACTS"):
        asgi.app_from_environment({})
    with pytest.raises(ServeConfigError, match="not a number"):
        asgi.app_from_environment({"VITSPARSE_ARTIFACTS": str(artifact), "VITSPARSE_MAX_QUEUE": "many"})


# --- the load test ------------------------------------------------------------------------------------------

def test_load_test_counts_every_request_and_writes_its_report(artifact, tmp_path) -> None:
    from vitsparse.bench.serve_load import (
        BATCH_ONE,
        DYNAMIC,
        LoadConfig,
        load_test,
        summary,
        write_load_report,
    )

    config = LoadConfig(engine="onnxruntime", concurrency=3, seconds=1.0, warmup_seconds=0.2, rounds=2,
                        batch_sizes=(1, 2, 3), max_delay_ms=2.0, engine_seconds=0.3)
    results = load_test({"tiny": artifact}, config, progress=False)
    assert [(r.model, r.mode) for r in results] == [("tiny", BATCH_ONE), ("tiny", DYNAMIC)]
    for result in results:
        assert result.ok > 0 and result.errors == 0 and result.lost == 0 and result.clean_exit
        assert result.answered == result.sent and result.p50_ms <= result.p99_ms
        assert result.requests_per_second == pytest.approx(result.ok / result.seconds, rel=1e-3)
    assert results[0].mean_batch == 1.0 and 1.0 <= results[1].mean_batch <= 3.0
    assert results[1].p99_bound_ms == pytest.approx(2.0 + 2 * results[1].engine_batch_ms["3"])
    files = write_load_report(tmp_path / "run", {"engine": "onnxruntime", "concurrency": 3}, results)
    assert json.loads(files["results"].read_text())["results"][1]["mode"] == DYNAMIC
    assert "| tiny | dynamic | 1,2,3 | 3 |" in files["report"].read_text() and files["plot"].stat().st_size
    assert any("dynamic batching" in line for line in summary(results))


def test_load_test_artifacts_are_written_for_the_engine_that_serves_them(tmp_path) -> None:
    """openvino-sparse gets its masked layers as sparse-kernel nodes (or masks would buy it nothing);
    another engine gets plain MatMuls it can run."""
    from vitsparse.bench.methods import parse_speed_setting
    from vitsparse.bench.serve_load import build_load_artifacts
    from vitsparse.runtime.sparse_extension import DOMAIN

    settings = (parse_speed_setting("0"), parse_speed_setting("0.9"))
    kwargs = {"img_size": 32}
    for engine, sparse_nodes in (("openvino-sparse", True), ("onnxruntime", False)):
        artifacts = build_load_artifacts("deit_tiny_patch16_224", settings, tmp_path / engine, engine=engine,
                                         model_kwargs=kwargs)
        domains = {name: {n.domain for n in onnx.load(path / "model.onnx").graph.node}
                   for name, path in artifacts.items()}
        assert DOMAIN not in domains["dense"] and (DOMAIN in domains["masked90"]) == sparse_nodes


def test_load_test_refuses_an_unknown_engine_before_building_anything(tmp_path, capsys) -> None:
    from vitsparse.bench.cli import main as cli_main

    assert cli_main(["load-test", "-e", "tensorrt", "-o", str(tmp_path)]) == 2
    assert "unknown engine 'tensorrt'" in capsys.readouterr().err and not any(tmp_path.iterdir())
