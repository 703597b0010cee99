"""`vitsparse prune MODEL --recipe FILE --data DIR -o OUT`: a recipe file run on the user's model and data.

The plan is checked, the data listed and the model built before any training. Each stage then runs,
is measured on `val/` and checkpointed (its epochs too); `--resume` continues after the last finished
stage, from the running stage's last epoch. The end is the verified export, `report.md` and
`results.json` (prune-and-bench's schema), written before `run.json` says the run finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from vitsparse.compiler import ExportConfig, PassManager, Recipe, export_artifact, trace
from vitsparse.compiler.trace import SERVING_KEY
from vitsparse.models import build_model, evaluate
from vitsparse.models.data import model_data_config
from vitsparse.pruners import distributed as dist_utils
from vitsparse.pruners.checkpoints import EpochStore, is_writer, resumable
from vitsparse.pruners.distributed import process_device
from vitsparse.runtime import check_engine_spec
from vitsparse.runtime.atomic import atomic_path

from .plan import RecipePlan, load_plan
from .prune_data import ImageData, PruneLoaders, check_image_data, make_loaders
from .run_folder import RunFolder
from .speed import TORCH
from .stages import StageContext


@dataclass(frozen=True)
class PruneRequest:
    """What `vitsparse prune` was asked to do."""

    model: str
    recipe: Path
    data: Path
    out: Path
    pretrained: bool = False
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    replace_head: bool = False
    resume: bool = False
    overwrite: bool = False
    epochs: int | None = None  # every training step capped at this many epochs
    speed: bool = True
    engines: tuple[str, ...] | None = None  # None: every engine installed here
    speed_seconds: float = 1.0  # per timing block, engine and model
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.speed_seconds > 0:
            raise ValueError(f"--time must be > 0 seconds, got {self.speed_seconds}")
        for column in self.engines or ():
            if column != TORCH:
                check_engine_spec(column)  # a misspelt engine fails now, not after the training

    def fingerprint(self, plan: RecipePlan) -> dict[str, Any]:
        """What a resumed run must share with the run it continues."""
        return {
            "plan": plan.digest(),
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "replace_head": self.replace_head,
            "data": str(Path(self.data).resolve()),
        }


@dataclass
class Start:
    """The model the plan starts from, its record so far and its class names."""

    graph: fx.GraphModule
    record: Recipe
    labels: tuple[str, ...] | None
    data_config: dict[str, Any]  # timm's data config: input size, mean, std, interpolation, crop


def start_model(request: PruneRequest, data: ImageData) -> Start:
    """The starting graph: an artifact folder to prune further, or a built model (its head checked
    against the data's classes, or replaced)."""
    folder = Path(request.model)
    if folder.is_dir() and (folder / "recipe.json").is_file():
        return _from_artifact(request, folder, data)
    model = build_model(
        request.model, pretrained=request.pretrained, checkpoint=request.checkpoint, **request.model_kwargs
    )
    kwargs = dict(request.model_kwargs)
    if request.replace_head:
        model.reset_classifier(len(data.classes))
        kwargs["num_classes"] = len(data.classes)
    _check_head(model.num_classes, data, request)
    graph = trace(model)
    labels = data.classes if request.replace_head else _labels(graph)
    return Start(
        graph, Recipe(base={"model": request.model, "kwargs": kwargs}), labels, model_data_config(model)
    )


def _from_artifact(request: PruneRequest, folder: Path, data: ImageData) -> Start:
    from vitsparse.runtime.artifact import load_artifact

    from .verify import rebuild_graph

    if request.replace_head or request.checkpoint or request.pretrained or request.model_kwargs:
        raise ValueError(
            f"{folder} is an artifact: its recipe and weights say what it is, so --replace-head, "
            "--checkpoint, --pretrained and --set do not apply"
        )
    artifact = load_artifact(folder)
    graph = rebuild_graph(artifact)
    _check_head(_output_width(graph), data, request)
    labels = tuple(artifact.meta["labels"]) if artifact.meta.get("labels") else None
    config = {
        **artifact.meta["preprocessing"],
        "input_size": tuple(artifact.meta["preprocessing"]["input_size"]),
    }
    return Start(graph, Recipe.load(folder / "recipe.json"), labels, config)


def _output_width(graph: fx.GraphModule) -> int:
    from vitsparse.compiler.trace import example_input

    with torch.no_grad():
        return int(graph(example_input(graph)).shape[-1])


def _labels(graph: fx.GraphModule) -> tuple[str, ...] | None:
    labels = (graph.meta.get(SERVING_KEY) or {}).get("labels")
    return tuple(labels) if labels else None


def _check_head(outputs: int, data: ImageData, request: PruneRequest) -> None:
    if outputs != len(data.classes):
        shown = ", ".join(data.classes[:6]) + (", ..." if len(data.classes) > 6 else "")
        raise ValueError(
            f"the model's head has {outputs} outputs but {request.data} has {len(data.classes)} "
            f"classes ({shown}); pass --replace-head to train a new head for these classes"
        )


@dataclass
class PruneResult:
    artifact: Path
    top1_before: float
    top1_after: float
    stages: list[dict[str, Any]]


def run_prune(request: PruneRequest) -> PruneResult:
    """Check everything, then run the plan's stages with checkpoints, export, and report.

    Under torchrun every rank runs the stages (DDP shards each training step's data); rank 0 alone
    writes OUT, and the others wait for it where they read what it wrote.
    """
    plan = load_plan(request.recipe)
    if request.epochs is not None:
        plan = plan.with_epochs(request.epochs)
    folder = RunFolder(request.out, writer=is_writer())
    data = check_image_data(request.data)
    start = start_model(request, data)  # the model is checked against the data before OUT is touched
    group = dist_utils.start(process_device(request.device))  # one process group for the whole run
    try:
        if folder.writer:
            folder.claim(request.fingerprint(plan), resume=request.resume, overwrite=request.overwrite)
        _barrier()
        _announce(request, plan, data, folder)
        settings = plan.settings
        loaders = make_loaders(
            data, start.data_config, settings.batch_size, settings.seed, settings.calibration_images
        )
        stages, final = _run_stages(request, plan, folder, start, loaders)
        if world_size() > 1:  # every rank says what it ended with: DDP must leave them equal
            _write_rank_digest(folder, final)
        return _finish(request, plan, folder, start, loaders, stages)
    finally:
        dist_utils.stop(group, wait=False)


def _announce(request: PruneRequest, plan: RecipePlan, data: ImageData, folder: RunFolder) -> None:
    skipped = len(data.skipped)
    _say(
        request,
        f"recipe {plan.source}: {len(plan.stages)} stages, {plan.training_epochs()} training epochs; "
        f"data {len(data.train)} train / {len(data.val)} val images, {len(data.classes)} classes"
        + ("; new head: training steps learn from labels, not from the starting model" if request.replace_head
           else "")
        + (
            f"; skipped {skipped} files that are not readable images ({data.skipped[0]}, ...)"
            if skipped
            else ""
        ),
    )
    folder.log("start", plan=plan.to_dict(), skipped=data.skipped, device=str(process_device(request.device)))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _run_stages(
    request: PruneRequest, plan: RecipePlan, folder: RunFolder, start: Start, loaders: PruneLoaders
) -> tuple[list[dict[str, Any]], fx.GraphModule]:
    """Every stage not yet checkpointed, in order; the stages' results and the final graph."""
    last = folder.last_stage()
    if last is None:
        top1 = evaluate(start.graph, loaders.val).top1
        folder.save_stage(0, start.graph, start.record, {"stage": "start", "top1": top1, "prepared": {}})
        folder.log("stage", index=0, stage="start", top1=top1)
        last = 0
    _barrier()  # rank 0 has written the starting model every rank's teacher is read from
    # a new head (--replace-head) starts random: its outputs would teach noise, so steps learn from labels
    teacher = None if request.replace_head else folder.load_stage(0)[0].eval()
    graph, record = folder.load_stage(last) if last else (start.graph, start.record)
    info = folder.stage_info(last)
    ctx = StageContext(
        PassManager(graph, recipe=record),
        teacher,
        loaders.train,
        loaders.calibration,
        plan.settings.seed,
        request.progress,
        request.device,
        dict(info.get("prepared", {})),
    )
    results = [folder.stage_info(i) for i in range(last + 1)]
    if last:
        _say(
            request,
            f"resuming after stage {last} of {len(plan.stages)} ({info['stage']}, top-1 "
            f"{100 * info['top1']:.2f} %)",
        )
    for index in range(last, len(plan.stages)):
        results.append(_run_stage(request, plan, folder, ctx, loaders, index))
    return results, ctx.manager.graph_module


def _run_stage(
    request: PruneRequest,
    plan: RecipePlan,
    folder: RunFolder,
    ctx: StageContext,
    loaders: PruneLoaders,
    index: int,
) -> dict[str, Any]:
    planned = plan.stages[index]
    following = plan.stages[index + 1].stage if index + 1 < len(plan.stages) else None
    number = index + 1
    _say(request, f"stage {number}/{len(plan.stages)}: {planned.kind} {planned.stage.settings()}")
    folder.log("stage-start", index=number, stage=planned.kind, settings=planned.stage.settings())
    ctx.loader = _streams(loaders.train, number)
    store = EpochStore(
        folder.epochs_dir(), writer=folder.writer, on_epoch=_epoch_reporter(request, folder, number)
    )
    started = time.perf_counter()
    with resumable(store):
        planned.stage.run(ctx, following)
    top1 = evaluate(ctx.manager.graph_module, loaders.val).top1
    info = {
        "stage": planned.kind,
        "top1": top1,
        "seconds": round(time.perf_counter() - started, 2),
        "epochs": planned.stage.training_epochs(),
        "macs": ctx.manager.costs.macs,
        "params": ctx.manager.costs.params,
        "prepared": ctx.prepared,
    }
    folder.save_stage(number, ctx.manager.graph_module, ctx.manager.recipe, info)
    store.clear()
    folder.log("stage", index=number, **{k: v for k, v in info.items() if k != "prepared"})
    _say(request, f"  top-1 after {planned.kind}: {100 * top1:.2f} % ({info['seconds']:.0f} s)")
    return info


def _streams(train, stage: int):
    """The stage's loaders, each on a stream of its own: numbered in the order the stage asks for them,
    so a stage redone after a crash draws the same orders."""
    count = itertools.count()
    return lambda augment: train(augment, stage * 1000 + next(count))


def _epoch_reporter(request: PruneRequest, folder: RunFolder, stage: int):
    def report(epoch: dict[str, Any]) -> None:
        folder.log("epoch", stage=stage, **epoch)
        if folder.writer and not request.progress:  # a terminal has the bar; a log gets a line per epoch
            print(
                f"    epoch {epoch['epoch']}/{epoch['epochs']}: loss {epoch['loss']:.4f}, train top-1 "
                f"{100 * epoch['train_top1']:.1f} % ({epoch['seconds']:.0f} s)",
                flush=True,
            )

    return report


def _finish(
    request: PruneRequest,
    plan: RecipePlan,
    folder: RunFolder,
    start: Start,
    loaders: PruneLoaders,
    stages: list[dict[str, Any]],
) -> PruneResult:
    from .prune_report import write_prune_report

    artifact = request.out / "artifact"
    if folder.writer:  # the other ranks must not read the last stage: rank 0 may not have written it yet
        graph, record = folder.load_stage(len(plan.stages))
        _label(graph, start.labels)
        _say(request, "exporting and verifying the ONNX file")
        settings = plan.settings
        export_artifact(
            graph,
            record,
            artifact,
            ExportConfig(dynamic_batch=True, quant_format=settings.int8_format,
                         sparse_kernels=settings.sparse_kernels),
            overwrite=True,
            extra_meta={"recipe_plan": plan.to_dict()},
        )
        folder.log("export", artifact=str(artifact))
        teacher, teacher_record = folder.load_stage(0)
        _label(teacher, start.labels)
        files = write_prune_report(
            request, plan, stages, (teacher, teacher_record), (graph, record), folder, loaders
        )
        folder.drop_intermediate_stages(len(plan.stages))
        folder.finish({"artifact": str(artifact), **{k: str(v) for k, v in files.items()}})
        _say(request, f"wrote {artifact}, {files['report']} and {files['results']}")
    return PruneResult(artifact, stages[0]["top1"], stages[-1]["top1"], stages)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (masks included), by name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_rank_digest(folder: RunFolder, graph: fx.GraphModule) -> None:
    rank = int(os.environ.get("RANK", "0"))
    path = folder.root / "ranks" / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps({"rank": rank, "world_size": world_size(), "state_sha256": state_digest(graph)})
        )


def _label(graph: fx.GraphModule, labels: tuple[str, ...] | None) -> None:
    if labels:
        serving = dict(graph.meta.get(SERVING_KEY) or {})
        serving["labels"] = list(labels)
        graph.meta[SERVING_KEY] = serving


def _say(request: PruneRequest, line: str) -> None:
    if is_writer():
        tqdm.write(line) if request.progress else print(line, flush=True)
