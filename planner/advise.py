"""A whole plan: the layout for the GPUs given, its stages, the fewest GPUs that fit, and what
to change when it does not fit. Returned as plain data (the --json output)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from models.partition import PartitionError, validate_parts
from planner.memory import PlanError, PlanOptions, StageModel
from planner.profile import ModelProfile
from planner.search import (
    Layout,
    balanced_fitting_parts,
    cap_bytes,
    check_pipe,
    choose_pipe,
    fits,
    min_gpus,
    min_peak_parts,
    stages,
)

SHORTEST_SEQ = 64  # the shortest --seq-len suggested when halving it


@dataclass(frozen=True)
class Request:
    """What the user asked: GPUs, and optionally a pipeline depth and an explicit split."""

    gpus: int
    pipe: int | None = None
    parts: list[int] | None = None

    def __post_init__(self) -> None:
        if self.gpus < 1:
            raise PlanError(f"--gpus must be at least 1, got {self.gpus}")
        if self.pipe is not None and self.gpus % self.pipe:
            raise PlanError(f"--gpus {self.gpus} is not a multiple of --pipe {self.pipe}: DeepSpeed needs pipe x data "
                            f"= number of GPUs; use --gpus {(self.gpus // self.pipe + 1) * self.pipe} or a --pipe "
                            f"that divides {self.gpus}")
        if self.parts is not None and self.pipe is not None and len(self.parts) != self.pipe:
            raise PlanError(f"--parts has {len(self.parts)} entries but --pipe is {self.pipe}; give one layer count "
                            f"per stage")


def resolve_layout(model: StageModel, req: Request) -> tuple[Layout, bool]:
    """(layout, whether its parts were given by the user)."""
    if req.parts is not None:
        pipe = len(req.parts)
        if req.gpus % pipe:
            raise PlanError(f"--parts has {pipe} stages but --gpus {req.gpus} is not a multiple of {pipe}: "
                            f"DeepSpeed needs pipe x data = number of GPUs")
        parts = validate_parts(req.parts, num_layers=model.n, num_stages=pipe)
        return Layout(pipe, req.gpus // pipe, parts), True
    if req.pipe is not None:
        check_pipe(model, req.pipe)
        pipe, data = req.pipe, req.gpus // req.pipe
    else:
        pipe, data, _ = choose_pipe(model, req.gpus)
    parts = balanced_fitting_parts(model, pipe, data) or min_peak_parts(model, pipe, data)
    return Layout(pipe, data, parts), False


def layout_summary(model: StageModel, layout: Layout) -> dict:
    cap = cap_bytes(model)
    rows = [m.as_dict(cap) for m in stages(model, layout)]
    worst = max(rows, key=lambda r: r["total"])
    return {"pipe": layout.pipe, "data": layout.data, "gpus": layout.gpus, "parts": layout.parts,
            "stages": rows, "fits": all(r["fits"] for r in rows), "peak": worst["total"],
            "peak_stage": worst["stage"], "host_per_node": host_per_node(model, layout)}


def host_per_node(model: StageModel, layout: Layout) -> list[int]:
    """Host bytes per node with offload: ranks are pipe-major (rank = stage * data + replica),
    so a node's consecutive ranks are replicas of one or a few stages."""
    if not model.opt.offload:
        return []
    per_stage = [m.cpu for m in stages(model, layout)]
    per_rank = [per_stage[r // layout.data] for r in range(layout.gpus)]
    size = model.opt.gpus_per_node
    return [sum(per_rank[i:i + size]) for i in range(0, len(per_rank), size)]


def fewest(model: StageModel) -> dict | None:
    found = min_gpus(model)
    if found is None:
        return None
    pipe, data = found
    parts = balanced_fitting_parts(model, pipe, data)
    return {"gpus": pipe * data, "pipe": pipe, "data": data, "parts": parts}


def make_plan(profile: ModelProfile, opt: PlanOptions, req: Request) -> dict:
    """Everything plan.py prints, as JSON-ready data (memory in bytes)."""
    model = StageModel(profile, opt)
    try:
        layout, given = resolve_layout(model, req)
    except PartitionError as err:
        raise PlanError(str(err)) from err
    plan = {"model": model_summary(profile), "options": asdict(opt), "optimizer_path": model.path.name,
            "gpu_mem": cap_bytes(model), "parts_given": given, **layout_summary(model, layout)}
    if given:
        suggested, _ = resolve_layout(model, replace(req, parts=None, pipe=layout.pipe))
        plan["suggested"] = layout_summary(model, suggested)
    plan["fewest"] = fewest(model)
    plan["alternatives"] = [] if plan["fits"] else alternatives(profile, opt, req)
    return plan


def model_summary(profile: ModelProfile) -> dict:
    spec = profile.spec
    return {"model_type": spec.model_type, "family": spec.family.name, "blocks": spec.num_blocks,
            "layers": spec.num_layers, "params": profile.total_params, "tied": spec.tied,
            "layer_params": [layer.params for layer in profile.layers], "tied_copy_params": profile.tied_copy_params}


def alternatives(profile: ModelProfile, opt: PlanOptions, req: Request) -> list[dict]:
    """One change at a time: does it fit on the GPUs given, and with how few GPUs would it."""
    changes: list[tuple[str, PlanOptions]] = []
    if not opt.grad_ckpt:
        changes.append(("--grad-ckpt", replace(opt, grad_ckpt=True)))
    if opt.optimizer == "adamw":
        changes.append(("--optimizer lion", replace(opt, optimizer="lion")))
    if opt.zero == 0:
        changes.append(("--zero 1", replace(opt, zero=1)))
    if not opt.offload:
        changes.append(("--offload", replace(opt, zero=1, offload=True)))
    if opt.micro_batch > 1:
        changes.append(("--micro-batch 1", replace(opt, micro_batch=1)))
    out = []
    for flag, changed in changes:
        out.append({"change": flag, **_try(profile, changed, req)})
    seq = _longest_fitting_seq(profile, opt, req)
    if seq is not None:
        out.append({"change": f"--seq-len {seq}", **_try(profile.at_seq_len(seq), replace(opt, seq_len=seq), req)})
    return out


def _try(profile: ModelProfile, opt: PlanOptions, req: Request) -> dict:
    model = StageModel(profile, opt)
    layout, _ = resolve_layout(model, _free_split(req))
    summary = layout_summary(model, layout)
    return {"fits_on_given": summary["fits"], "pipe": layout.pipe, "data": layout.data, "parts": layout.parts,
            "peak": summary["peak"], "fewest": fewest(model)}


def _free_split(req: Request) -> Request:
    """The same GPUs (and pipeline depth, if one was asked for), with the split left to us."""
    return replace(req, parts=None, pipe=req.pipe or (len(req.parts) if req.parts else None))


def _fits_on_given(profile: ModelProfile, opt: PlanOptions, req: Request) -> bool:
    model, free = StageModel(profile, opt), _free_split(req)
    if free.pipe is not None:
        return fits(model, free.pipe, req.gpus // free.pipe)
    return choose_pipe(model, req.gpus)[2]


def _longest_fitting_seq(profile: ModelProfile, opt: PlanOptions, req: Request) -> int | None:
    seq = opt.seq_len // 2
    while seq >= SHORTEST_SEQ:
        if _fits_on_given(profile.at_seq_len(seq), replace(opt, seq_len=seq), req):
            return seq
        seq //= 2
    return None
