"""Resumable checkpoints and exported weights under save_path.

    save_path/checkpoints/step_00000100/   DeepSpeed's state (module, optimizer, scheduler, loss scale)
                         step_00000100/complete.json   written last, after every rank has saved
    save_path/weights/step_00000100/       the weights as a pipeline dir (manifest.json written last)

A checkpoint without complete.json (the job died while saving) is never resumed from, so the
previous complete one stays the newest usable. Only complete checkpoints count towards
`keep_checkpoints`; leftovers of interrupted saves are removed once a newer save completes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data import PromptTemplate, save_template
from models.convert import HF_SIDE_FILES
from models.pipedir import WEIGHTS_SUBDIR, Manifest, write_layer, write_manifest
from training.config import ConfigError

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"


def data_parallel_rank(pipe: Any) -> int:
    """This rank's index among the replicas of its pipeline stage."""
    return pipe.topology().get_coord(dist.get_rank()).data


def tag(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class Found:
    tag: str
    step: int
    meta: dict[str, Any]


def newest_complete(save_path: Path) -> Found | None:
    root = save_path / CHECKPOINTS
    done = sorted(d for d in root.glob("step_*") if (d / COMPLETE).is_file()) if root.is_dir() else []
    if not done:
        return None
    meta = json.loads((done[-1] / COMPLETE).read_text())
    return Found(tag=done[-1].name, step=int(meta["step"]), meta=meta)


def check_compatible(found: Found, expected: dict[str, Any], save_path: Path) -> None:
    """A checkpoint can only continue the same run layout: DeepSpeed stores optimizer state per
    stage and rank, and the data order depends on the batch size and seed."""
    diffs = {k: (found.meta.get(k), v) for k, v in expected.items() if found.meta.get(k) != v}
    if diffs:
        detail = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diffs.items())
        raise ConfigError(f"{save_path / CHECKPOINTS / found.tag} was written by a different run layout ({detail}); "
                          f"resume with the same settings, or choose a new save_path")


def save(engine: Any, save_path: Path, step: int, meta: dict[str, Any], keep: int) -> None:
    """All ranks call this. DeepSpeed writes the state; rank 0 marks it complete, then prunes."""
    root = save_path / CHECKPOINTS
    engine.save_checkpoint(str(root), tag=tag(step), save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        marker = root / tag(step) / COMPLETE
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")
        os.replace(tmp, marker)
        _prune(root, keep)
    dist.barrier()


def _prune(root: Path, keep: int) -> None:
    dirs = sorted(root.glob("step_*"))
    complete = [d for d in dirs if (d / COMPLETE).is_file()]
    newest = complete[-1]
    for d in dirs:
        if (d in complete[:-keep]) or (d not in complete and d < newest):
            shutil.rmtree(d, ignore_errors=True)


def resume(engine: Any, save_path: Path, found: Found) -> None:
    """Load module, optimizer, scheduler and loss-scaler state of a complete checkpoint."""
    load_path, _ = engine.load_checkpoint(str(save_path / CHECKPOINTS), tag=found.tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise ConfigError(f"{save_path / CHECKPOINTS / found.tag} could not be loaded; remove it to resume from an "
                          f"older checkpoint")


def export_weights(pipe: Any, *, model_path: Path, save_path: Path, step: int, template: PromptTemplate,
                   final: bool = False) -> Path:
    """Write the current weights as a pipeline dir (the layout hg_to_pp writes). Each stage's
    first data-parallel rank writes its own layers; rank 0 adds config, tokenizer and prompt
    template, and the manifest last."""
    out = save_path / WEIGHTS_SUBDIR / tag(step)
    if dist.get_rank() == 0:
        if (out / "manifest.json").exists():
            (out / "manifest.json").unlink()  # re-exporting a step (after a resume): incomplete until done
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if data_parallel_rank(pipe) == 0:
        for layer, tensors in pipe.stage_layers().items():
            write_layer(out, layer, {k: v.detach().cpu() for k, v in tensors.items()})
    dist.barrier()
    if dist.get_rank() == 0:
        for name in HF_SIDE_FILES:
            if (model_path / name).is_file():
                shutil.copyfile(model_path / name, out / name)
        save_template(template, out)
        manifest = Manifest.for_spec(pipe.spec, next(p for p in pipe.parameters()).dtype, step=step)
        manifest.extra["final"] = final
        write_manifest(out, manifest)
    dist.barrier()
    return out
