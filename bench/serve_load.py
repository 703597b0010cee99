"""A bounded load test of `vitsparse serve` on loopback: N clients for T seconds against each setting.

Each setting is one server process (`python -m vitsparse.runtime serve`, torch-free) for one artifact,
serving either one image per engine call (batch-1) or gathering requests (dynamic batching). All of
them start first; then the settings take turns in rounds, so noise on a shared machine spreads over
all of them. Every client keeps one HTTP connection and posts the same JPEG to /classify as fast as
answers come back. Requests started in each turn's warm-up are not counted; every request started
after is either answered (counted by status) or lost (no response). The server's /metrics gives the batch
sizes it really ran, and the engine's own time per batch is measured in the same process beforehand.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .plotting import pyplot, save_figure

BATCH_ONE = "batch-1"
DYNAMIC = "dynamic"


@dataclass(frozen=True)
class LoadConfig:
    """Clients, duration, and the two serving modes compared (batch-1 vs dynamic batching)."""

    engine: str
    concurrency: int = 8
    seconds: float = 20.0
    warmup_seconds: float = 2.0  # per round and setting, not counted
    # dynamic batching compiles these: every size up to the largest, so a part-full batch runs at its
    # own size instead of being padded to the next compiled one; batch-1 compiles (1,)
    batch_sizes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    max_delay_ms: float = 10.0
    num_cores: int | None = None
    num_streams: int = 1
    rounds: int = 4  # the settings take turns, `seconds / rounds` each per round
    engine_seconds: float = 4.0  # each compiled size's engine time, measured alone first
    request_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.seconds <= 0 or self.warmup_seconds < 0 or self.rounds < 1:
            raise ValueError(f"concurrency must be >= 1 and seconds > 0, got {self.concurrency} and "
                             f"{self.seconds}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive, got {list(self.batch_sizes)}")


@dataclass
class LoadResult:
    """One setting: what the clients saw and what the server ran."""

    model: str
    mode: str
    batch_sizes: list[int]
    max_delay_ms: float
    concurrency: int
    seconds: float
    sent: int
    answered: int
    ok: int
    errors: int
    lost: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    mean_batch: float | None
    engine_batch_ms: dict[str, float] = field(default_factory=dict)  # engine median per compiled size
    p99_bound_ms: float | None = None  # max delay + two batches of the largest size (dynamic only)
    clean_exit: bool | None = None  # the server drained and exited 0 on SIGTERM

    @property
    def within_bound(self) -> bool | None:
        return None if self.p99_bound_ms is None else self.p99_ms <= self.p99_bound_ms


@dataclass
class _ClientLog:
    started: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lost: int = 0


def sample_jpeg(size: tuple[int, int] = (500, 375), seed: int = 0) -> bytes:
    """A photo-sized JPEG (smooth colour fields plus noise), the same bytes every run."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / width, ys / height, (xs + ys) / (width + height)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _client(port: int, path: str, body: bytes, measure_from: float, stop_at: float, timeout: float,
            log: _ClientLog) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "image/jpeg"}
    while (started := time.perf_counter()) < stop_at:
        counted = started >= measure_from
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            if counted:
                log.started.append(started)
                log.lost += 1
            continue
        if counted:
            log.started.append(started)
            log.latencies.append(time.perf_counter() - started)
            log.statuses.append(status)
    connection.close()


@dataclass
class Measurement:
    """What the clients saw in one timed block: requests started, answers by status, lost, latencies."""

    seconds: float
    sent: int = 0
    ok: int = 0
    errors: int = 0
    lost: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Measurement) -> Measurement:
        return Measurement(self.seconds + other.seconds, self.sent + other.sent, self.ok + other.ok,
                           self.errors + other.errors, self.lost + other.lost,
                           self.latencies + other.latencies)

    def summary(self) -> dict:
        latencies = sorted(self.latencies)
        return {"sent": self.sent, "answered": self.ok + self.errors, "ok": self.ok, "errors": self.errors,
                "lost": self.lost, "seconds": round(self.seconds, 3),
                "requests_per_second": self.ok / self.seconds if self.seconds > 0 else 0.0,
                "p50_ms": _percentile(latencies, 50) * 1e3, "p99_ms": _percentile(latencies, 99) * 1e3}


def drive_load(port: int, model: str, body: bytes, concurrency: int, seconds: float, warmup_seconds: float,
               timeout: float) -> Measurement:
    """`concurrency` clients for warmup + seconds; what they saw of requests started after the warm-up."""
    path = f"/v2/models/{model}/classify"
    start = time.perf_counter()
    measure_from = start + warmup_seconds
    stop_at = measure_from + seconds
    logs = [_ClientLog() for _ in range(concurrency)]
    threads = [threading.Thread(target=_client, args=(port, path, body, measure_from, stop_at, timeout, log),
                                daemon=True) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = [s for log in logs for s in log.statuses]
    ok = sum(1 for s in statuses if s == 200)
    return Measurement(seconds=time.perf_counter() - measure_from,  # with the last answers' completion
                       sent=sum(len(log.started) for log in logs), ok=ok, errors=len(statuses) - ok,
                       lost=sum(log.lost for log in logs),
                       latencies=[x for log in logs for x in log.latencies])


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    rank = (len(values) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return values[low] + (values[high] - values[low]) * (rank - low)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(artifact: Path, name: str, engine: str, batch_sizes: tuple[int, ...], max_delay_ms: float,
                   config: LoadConfig, queue: int, status: dict) -> Iterator[int]:
    """A `python -m vitsparse.runtime serve` process, ready; SIGTERM on exit, its exit code in status."""
    port = _free_port()
    command = [sys.executable, "-m", "vitsparse.runtime", "serve", f"{name}={artifact}", "--engine", engine,
               "--port", str(port), "--batch-sizes", ",".join(map(str, batch_sizes)),
               "--max-delay-ms", str(max_delay_ms), "--max-queue", str(queue), "--log-level", "warning",
               "--num-streams", str(config.num_streams)]
    if config.num_cores:
        command += ["--num-cores", str(config.num_cores)]
    # the server's log goes to a file: a pipe nobody reads during the run would fill and stall it
    log = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True,
                               env={**os.environ, "NM_DISABLE_ANALYTICS": "1"})
    try:
        _wait_ready(port, process, log)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            status["exit_code"] = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            status["exit_code"] = None
        status["stderr"] = _read_log(log)
        log.close()


def _read_log(log) -> str:
    log.seek(0)
    return log.read()


def _wait_ready(port: int, process: subprocess.Popen, log, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {_read_log(log).strip()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/v2/health/ready")
            if connection.getresponse().status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the server on port {port} was not ready within {timeout:.0f} s")


def scrape_mean_batch(port: int, model: str) -> float | None:
    """Mean items per engine call, from the server's vitsparse_batch_size histogram."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    values = {}
    for part in ("sum", "count"):
        match = re.search(rf'^vitsparse_batch_size_{part}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
        values[part] = float(match.group(1)) if match else None
    return values["sum"] / values["count"] if values["count"] else None


def engine_batch_ms(artifact: Path, engine: str, sizes: tuple[int, ...], num_cores: int | None,
                    seconds: float = 4.0) -> dict[str, float]:
    """The engine's median time per call at each size, measured here before the servers start."""
    from vitsparse.runtime import benchmark_model

    medians = {}
    for size in sizes:
        result = benchmark_model(artifact / "model.onnx", engine, batch_size=size, num_cores=num_cores,
                                 seconds=seconds, warmup_seconds=min(1.0, seconds))
        medians[str(size)] = round(result.latency_ms["p50"], 3)
    return medians


def build_load_artifacts(model_name: str, settings: tuple, directory: Path, *, engine: str | None = None,
                         pretrained: bool = False, checkpoint: str | None = None,
                         model_kwargs: dict | None = None) -> dict[str, Path]:
    """One servable artifact per `SpeedSetting` (sparsity 0: dense; else magnitude masks of its
    pattern), batch dimension dynamic, written the way `engine` wants it (openvino-sparse: pruned
    layers as sparse-kernel nodes)."""
    from vitsparse.compiler import ExportConfig, PassManager, Recipe, export_artifact, trace
    from vitsparse.models import build_model
    from vitsparse.pruners import MagnitudePass

    from .speed import ENGINE_EXPORT

    kwargs = dict(model_kwargs or {})
    model = build_model(model_name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    base = {"model": model_name, "kwargs": kwargs, "pretrained": pretrained, "checkpoint": checkpoint}
    artifacts = {}
    for setting in settings:
        manager = PassManager(trace(model), recipe=Recipe(base=base))
        name = "dense" if not setting.sparsity else f"masked{round(setting.sparsity * 100)}"
        if setting.sparsity:
            name += "" if setting.pattern == "unstructured" else f"-{setting.pattern.replace(':', 'of')}"
            manager.run(MagnitudePass(sparsity=setting.sparsity, pattern=setting.pattern))
        artifacts[name] = export_artifact(manager.graph_module, manager.recipe, directory / name,
                                          ExportConfig(dynamic_batch=True, **ENGINE_EXPORT.get(engine, {})),
                                          overwrite=True).directory
    return artifacts


def load_test(artifacts: dict[str, Path], config: LoadConfig, progress: bool = True) -> list[LoadResult]:
    """Every artifact in both modes, each its own server, all started first and then timed in
    alternating rounds (a slow minute on a shared machine then hits every setting alike)."""
    body = sample_jpeg()
    sizes = tuple(sorted({1, *config.batch_sizes}))
    engine_ms = {name: engine_batch_ms(artifact, config.engine, sizes, config.num_cores,
                                       config.engine_seconds) for name, artifact in artifacts.items()}
    modes = ((BATCH_ONE, (1,), 0.0), (DYNAMIC, tuple(config.batch_sizes), config.max_delay_ms))
    settings = [(name, mode, sizes, delay) for name in artifacts for mode, sizes, delay in modes]
    statuses = {setting: {} for setting in settings}
    queue = max(64, 4 * config.concurrency)
    with contextlib.ExitStack() as servers:
        ports = {}
        for setting in settings:
            name, mode, sizes, delay = setting
            if progress:
                print(f"load test: starting {name} {mode} (batch sizes {list(sizes)})", flush=True)
            ports[setting] = servers.enter_context(server_process(
                artifacts[name], name, config.engine, sizes, delay, config, queue, statuses[setting]))
        measured = {setting: Measurement(0.0) for setting in settings}
        for round_index in range(config.rounds):
            if progress:
                print(f"load test: round {round_index + 1}/{config.rounds}, {config.concurrency} clients, "
                      f"{config.seconds / config.rounds:g} s per setting", flush=True)
            for setting in settings:
                block = drive_load(ports[setting], setting[0], body, config.concurrency,
                                   config.seconds / config.rounds, config.warmup_seconds,
                                   config.request_timeout)
                measured[setting] = measured[setting].add(block)
        mean_batches = {setting: scrape_mean_batch(ports[setting], setting[0]) for setting in settings}
    results = []
    for setting in settings:
        name, mode, sizes, delay = setting
        bound = config.max_delay_ms + 2 * engine_ms[name][str(max(sizes))] if mode == DYNAMIC else None
        results.append(LoadResult(model=name, mode=mode, batch_sizes=list(sizes), max_delay_ms=delay,
                                  concurrency=config.concurrency, mean_batch=mean_batches[setting],
                                  engine_batch_ms=engine_ms[name], p99_bound_ms=bound,
                                  clean_exit=statuses[setting].get("exit_code") == 0,
                                  **measured[setting].summary()))
    return results


def load_table(results: list[LoadResult]) -> str:
    """Markdown: one line per setting, plus dynamic vs batch-1 and each model vs the first (dense)."""
    lines = ["| model | mode | batch sizes | clients | req/s | p50 ms | p99 ms | p99 bound ms | mean batch | "
             "errors | lost | vs batch-1 | vs first model |", "|---" * 13 + "|"]
    by_key = {(r.model, r.mode): r for r in results}
    first = results[0].model if results else None
    for r in results:
        single, reference = by_key.get((r.model, BATCH_ONE)), by_key.get((first, r.mode))
        bound = f"{r.p99_bound_ms:.0f}" if r.p99_bound_ms is not None else "–"
        mean_batch = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "–"
        lines.append(f"| {r.model} | {r.mode} | {','.join(map(str, r.batch_sizes))} | {r.concurrency} | "
                     f"{r.requests_per_second:.2f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {bound} | "
                     f"{mean_batch} | {r.errors} | {r.lost} | {_ratio(r, single)} | {_ratio(r, reference)} |")
    return "\n".join(lines)


def _ratio(result: LoadResult, base: LoadResult | None) -> str:
    if base is None or not base.requests_per_second:
        return "–"
    return f"{result.requests_per_second / base.requests_per_second:.2f}×"


def plot_load(results: list[LoadResult], path: Path) -> None:
    """Requests/sec and p99 latency per model, batch-1 beside dynamic batching."""
    plt = pyplot()
    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for offset, mode in enumerate((BATCH_ONE, DYNAMIC)):
        rows = [next((r for r in results if r.model == m and r.mode == mode), None) for m in models]
        xs = [i + (offset - 0.5) * 0.38 for i in range(len(models))]
        axes[0].bar(xs, [r.requests_per_second if r else 0 for r in rows], width=0.38, label=mode)
        axes[1].bar(xs, [r.p99_ms if r else 0 for r in rows], width=0.38, label=mode)
    for ax, label in zip(axes, ("requests / s", "p99 latency (ms)"), strict=True):
        ax.set_xticks(range(len(models)), models, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"vitsparse serve, {results[0].concurrency} clients on loopback" if results else "")
    save_figure(fig, path)


def write_load_report(directory: Path, meta: dict, results: list[LoadResult]) -> dict[str, Path]:
    """results.json, report.md and load.png in `directory`, each written to a temp file and renamed."""
    from .report import write_files_atomically

    directory.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, "results": [{**asdict(r), "within_bound": r.within_bound} for r in results]}
    report = "\n".join([f"# vitsparse serve load test ({meta.get('started', '')})", "",
                        f"Engine {meta.get('engine')}, {meta.get('concurrency')} clients, "
                        f"{meta.get('seconds')} s measured per setting in {meta.get('rounds')} "
                        f"alternating rounds (each after {meta.get('warmup_seconds')} s of warm-up), "
                        f"dynamic batching at batch sizes {meta.get('batch_sizes')} with "
                        f"--max-delay-ms {meta.get('max_delay_ms')}, {meta.get('num_streams')} stream(s) per "
                        f"server.", "", load_table(results), ""])
    writers = {"results": ("results.json", lambda p: p.write_text(json.dumps(document, indent=2) + "\n")),
               "report": ("report.md", lambda p: p.write_text(report)),
               "plot": ("load.png", lambda p: plot_load(results, p))}
    return write_files_atomically(directory, writers)


def summary(results: list[LoadResult]) -> list[str]:
    """A line per setting, then batching vs batch-1 (with the p99 bound) and each model vs the first."""
    lines = []
    for r in results:
        lines.append(f"{r.model} {r.mode}: {r.requests_per_second:.2f} req/s, p50 {r.p50_ms:.1f} ms, "
                     f"p99 {r.p99_ms:.1f} ms, {r.errors} errors, {r.lost} lost of {r.sent}")
    models = list(dict.fromkeys(r.model for r in results))
    by_key = {(r.model, r.mode): r for r in results}
    for model in models:
        single, dynamic = by_key.get((model, BATCH_ONE)), by_key.get((model, DYNAMIC))
        if single and dynamic and single.requests_per_second:
            lines.append(f"{model}: dynamic batching {_ratio(dynamic, single)} batch-1; "
                         f"p99 {dynamic.p99_ms:.0f} ms vs bound {dynamic.p99_bound_ms:.0f} ms")
    if len(models) > 1:
        for mode in (BATCH_ONE, DYNAMIC):
            base = by_key.get((models[0], mode))
            for model in models[1:]:
                other = by_key.get((model, mode))
                if base and other:
                    lines.append(f"{model} vs {models[0]} ({mode}): {_ratio(other, base)} requests/s")
    return lines


__all__ = ["BATCH_ONE", "DYNAMIC", "LoadConfig", "LoadResult", "Measurement", "build_load_artifacts",
           "drive_load", "load_table", "load_test", "plot_load", "sample_jpeg", "server_process", "summary",
           "write_load_report"]
