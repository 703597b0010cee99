"""The output folder of `vitsparse prune`: what it holds, and how it stays truthful through a crash.

    OUT/run.json              the run's fingerprint (plan digest, model, data) and status
    OUT/log.jsonl             one JSON object per event (stage start/end, epoch, export), appended
    OUT/checkpoints/stage-NN  record + weights + stage.json after stage NN (stage-00: the starting model;
                              a finished run keeps that one and the last)
    OUT/checkpoints/epochs/   the running stage's epoch states (pruners/checkpoints.py)
    OUT/artifact/, OUT/report.md, OUT/results.json   written at the end

Every file is written to a temp path and renamed; a stage folder appears whole or not at all.
`run.json` says "finished" only after everything else is in place, so an interrupted OUT never looks
finished. An OUT holding another run is refused unless `--resume` (same fingerprint) or `--overwrite`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch.fx as fx

from vitsparse.compiler import Recipe
from vitsparse.compiler.recipe import load_weights, replay, save_weights
from vitsparse.models import build_model
from vitsparse.runtime.atomic import atomic_dir, atomic_path

RUN_FILE = "run.json"
STATUS_RUNNING, STATUS_FINISHED = "running", "finished"


class RunFolder:
    """One prune run's OUT folder."""

    def __init__(self, root: str | Path, writer: bool = True) -> None:
        self.root = Path(root)
        self.writer = writer
        self.checkpoints = self.root / "checkpoints"

    def claim(self, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Start or continue a run here; ValueError when OUT holds something else."""
        run_file = self.root / RUN_FILE
        present = self.root.exists() and any(self.root.iterdir())
        if present and not run_file.is_file():
            raise ValueError(
                f"{self.root} is not empty and holds no vitsparse prune run; choose a new -o folder"
            )
        if present and overwrite and self.writer:
            shutil.rmtree(self.root)
        elif present and resume:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
            if previous.get("status") == STATUS_FINISHED:
                raise ValueError(f"{self.root} holds a finished run (artifact {previous.get('artifact')}); "
                                 "nothing to resume")
            changed = sorted(
                k for k in fingerprint if previous.get("fingerprint", {}).get(k) != fingerprint[k]
            )
            if changed:
                raise ValueError(
                    f"{self.root} holds a run with other {', '.join(changed)}; --resume continues "
                    "the same run only (use --overwrite to start over)"
                )
        elif present and not overwrite:
            status = json.loads(run_file.read_text(encoding="utf-8")).get("status")
            raise ValueError(
                f"{self.root} already holds a {status} run; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        elif resume:
            raise ValueError(f"--resume: {self.root} holds no run to continue")
        self.write_json(RUN_FILE, {"status": STATUS_RUNNING, "fingerprint": fingerprint, "updated": _now()})

    def finish(self, summary: dict[str, Any]) -> None:
        run = json.loads((self.root / RUN_FILE).read_text(encoding="utf-8"))
        self.write_json(RUN_FILE, {**run, "status": STATUS_FINISHED, "updated": _now(), **summary})

    def log(self, event: str, **fields: Any) -> None:
        """Append one line to log.jsonl (rank 0)."""
        if not self.writer:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": _now(), "event": event, **fields}) + "\n")

    def write_json(self, name: str, data: Any) -> None:
        if not self.writer:
            return
        with atomic_path(self.root / name) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def stage_dir(self, index: int) -> Path:
        return self.checkpoints / f"stage-{index:02d}"

    def epochs_dir(self) -> Path:
        return self.checkpoints / "epochs"

    def save_stage(self, index: int, gm: fx.GraphModule, record: Recipe, info: dict[str, Any]) -> None:
        """The graph after stage `index`: written to a temp folder, then renamed into place."""
        if not self.writer:
            return
        with atomic_dir(self.stage_dir(index)) as staging:
            record.save(staging / "recipe.json")
            save_weights(gm, staging / "weights.safetensors")
            (staging / "stage.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def drop_intermediate_stages(self, last: int) -> None:
        """A finished run keeps the starting model and the last stage; the rest only served resuming."""
        for index in range(1, last):
            shutil.rmtree(self.stage_dir(index), ignore_errors=True)
        shutil.rmtree(self.epochs_dir(), ignore_errors=True)

    def last_stage(self) -> int | None:
        """The highest stage with a complete checkpoint, or None."""
        done = [
            int(p.name.split("-")[1])
            for p in self.checkpoints.glob("stage-*")
            if p.is_dir() and (p / "stage.json").is_file()
        ]
        return max(done) if done else None

    def stage_info(self, index: int) -> dict[str, Any]:
        return json.loads((self.stage_dir(index) / "stage.json").read_text(encoding="utf-8"))

    def load_stage(self, index: int) -> tuple[fx.GraphModule, Recipe]:
        """The graph and record saved after stage `index`: the record replayed on a fresh base model,
        then its weights loaded."""
        folder = self.stage_dir(index)
        record = Recipe.load(folder / "recipe.json")
        base = build_model(record.base["model"], **(record.base.get("kwargs") or {}))
        gm = load_weights(replay(base, record), folder / "weights.safetensors")
        return gm, record


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
