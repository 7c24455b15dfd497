"""Optimizer, parameter groups and the DeepSpeed config handed to deepspeed.initialize.

AdamW/Adam & co. are DeepSpeed's own (fused on GPU, its CPU kernels elsewhere): the config's
optimizer block goes to DeepSpeed as written. Lion (lion-pytorch) is not a DeepSpeed optimizer,
so it is built here and passed as a client optimizer.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from training.config import DS_SCHEDULERS_NEEDING_TOTAL, BatchShape, ConfigError, TrainConfig

NO_PRINT = 2**31 - 1  # DeepSpeed's own per-step print is replaced by our progress bar


def param_groups(model: nn.Module, no_decay: list[str]) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases/norms (names containing a `no_decay` fragment)
    with weight_decay 0. The decayed group takes the optimizer's configured weight decay."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if any(fragment in name for fragment in no_decay) else decay).append(param)
    groups: list[dict[str, Any]] = [{"params": decay}]
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups


def train_dtype(ds: dict[str, Any]) -> torch.dtype:
    if _enabled(ds.get("fp16")):
        return torch.float16
    if _enabled(ds.get("bf16")):
        return torch.bfloat16
    return torch.float32


def _enabled(block: Any) -> bool:
    return isinstance(block, dict) and bool(block.get("enabled", False))


def is_lion(ds: dict[str, Any]) -> bool:
    opt = ds.get("optimizer")
    return isinstance(opt, dict) and str(opt.get("type", "")).lower() == "lion"


def check_deepspeed_keys(ds: dict[str, Any], *, cuda: bool) -> None:
    """Combinations DeepSpeed would reject late (or silently mis-run) with this toolkit."""
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1):
        raise ConfigError(f"zero_optimization.stage {stage} cannot be combined with pipeline parallelism; use stage 1 "
                          f"(optimizer states partitioned over data-parallel ranks, optionally offloaded to the CPU) or 0")
    if _enabled(ds.get("fp16")) and _enabled(ds.get("bf16")):
        raise ConfigError("fp16 and bf16 are both enabled; enable one of them")
    if _enabled(ds.get("fp16")) and not cuda:
        raise ConfigError("fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16 training); on the CPU use "
                          "bf16 or neither")
    opt = ds.get("optimizer")
    if opt is not None and not (isinstance(opt, dict) and isinstance(opt.get("type"), str)):
        raise ConfigError(f'optimizer must be {{"type": "AdamW" | "Lion" | ..., "params": {{...}}}}, got {opt!r}')
    if is_lion(ds):
        unknown = set(opt.get("params", {})) - {"lr", "betas", "weight_decay", "use_triton"}
        if unknown:
            raise ConfigError(f"optimizer Lion takes params lr, betas, weight_decay, use_triton; unknown: {sorted(unknown)}")
    if _enabled((ds.get("tensorboard") or {})):
        try:
            import tensorboard  # noqa: F401
        except ImportError as err:
            raise ConfigError("tensorboard is enabled but the tensorboard package is not installed: "
                              "pip install tensorboard (or use csv_monitor)") from err


def deepspeed_config(cfg: TrainConfig, shape: BatchShape, total_steps: int, *, cuda: bool) -> dict[str, Any]:
    """A copy of the user's DeepSpeed keys with what we derive: resolved batch sizes, the total
    steps a decaying scheduler needs, monitor paths under save_path, Lion's switches, and torch's
    Adam on machines without CUDA."""
    ds = copy.deepcopy(cfg.ds)
    opt = ds.get("optimizer")
    if not cuda and isinstance(opt, dict) and str(opt.get("type", "")).lower() in ("adam", "adamw"):
        # DeepSpeed's CPU Adam kernel keeps beta**step incrementally in a live process but recomputes
        # it with pow() after a restart, so a resumed run differs in the last bit; it also needs a
        # compile on first use. torch's Adam (DeepSpeed's own "torch_adam" switch) is the same math.
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    ds["train_micro_batch_size_per_gpu"] = shape.micro
    ds["gradient_accumulation_steps"] = shape.accum
    ds["train_batch_size"] = shape.global_rows
    ds.setdefault("steps_per_print", NO_PRINT)
    scheduler = ds.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("type") in DS_SCHEDULERS_NEEDING_TOTAL:
        params = scheduler.setdefault("params", {})
        if scheduler["type"] != "OneCycle":
            params.setdefault("total_num_steps", total_steps)
    for monitor in ("tensorboard", "csv_monitor"):
        if _enabled(ds.get(monitor)):
            ds[monitor].setdefault("output_path", str(cfg.save_path / "monitor"))
            ds[monitor].setdefault("job_name", "train")
    if clips_without_norm(cfg.ds):
        ds["gradient_clipping"] = 0.0  # NormKeepingClip clips instead, at the same point of the step
    if is_lion(ds):
        del ds["optimizer"]  # a client optimizer (see build_client_optimizer)
        if (ds.get("zero_optimization") or {}).get("stage", 0) >= 1:
            ds["zero_allow_untested_optimizer"] = True
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def clips_without_norm(ds: dict[str, Any]) -> bool:
    """fp32 without ZeRO: the one path where DeepSpeed clips gradients but keeps no norm."""
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    return stage == 0 and train_dtype(ds) == torch.float32


class NormKeepingClip:
    """Clipping for that path, done with DeepSpeed's own clip_grad_norm_ (the function its
    engine calls there) from an optimizer step pre-hook, so the pre-clip norm can be shown.
    DeepSpeed's clipping is switched off for it in deepspeed_config."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.norm: float | None = None

    def attach(self, engine: Any) -> None:
        self.engine = engine
        engine.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        from deepspeed.runtime.utils import clip_grad_norm_

        limit = self.max_norm if self.max_norm > 0 else float("inf")
        self.norm = float(clip_grad_norm_(self.engine.module.parameters(), max_norm=limit, mpu=self.engine.mpu))


def user_clip(ds: dict[str, Any]) -> float:
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    return float(ds.get("gradient_clipping", GRADIENT_CLIPPING_DEFAULT))


def build_client_optimizer(ds: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer | None:
    """Lion from lion-pytorch; None for optimizers DeepSpeed builds from its config."""
    if not is_lion(ds):
        return None
    from lion_pytorch import Lion

    params = dict(ds["optimizer"].get("params", {}))
    # The triton kernel runs on CUDA tensors only; elsewhere the plain PyTorch update is used.
    use_triton = bool(params.pop("use_triton", False)) and torch.cuda.is_available()
    if "betas" in params:
        params["betas"] = tuple(params["betas"])
    return Lion(groups, use_triton=use_triton, **params)
