"""train_ds.py's work: validate everything cheap first, then build this rank's stage, train,
evaluate, checkpoint, export — and resume exactly when rerun with the same command."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import ProcessTopology
from transformers import AutoTokenizer

from data import DataError, DataSettings, PromptTemplate, Rows, load_rows, load_template
from models.common import ModelConfigError, pipeline_loss
from models.names import WeightNameError
from models.partition import PartitionError, resolve_parts
from models.pipedir import TEMPLATE_FILE, PipelineDirError, open_pipeline_dir
from models.pipeline import Init, StagedPipeline, WeightSource
from models.spec import BuildOptions, ModelSpec, layer_costs, load_spec, slots
from training import checkpoint
from training.checkpoint import data_parallel_rank
from training.config import BatchShape, ConfigError, TrainConfig, batch_shape
from training.cpu_comm import release_shm_buffer
from training.loader import Schedule, eval_batches, micro_batches, step_token_counts
from training.optim import (
    NormKeepingClip,
    build_client_optimizer,
    clips_without_norm,
    check_deepspeed_keys,
    deepspeed_config,
    param_groups,
    train_dtype,
    user_clip,
)
from training.progress import Progress

log = logging.getLogger("pipeft")


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what to do."""


@dataclass
class Plan:
    """Everything decided before the model is built (cheap, and fails early on bad input)."""

    cfg: TrainConfig
    spec: ModelSpec
    model_dir: Path
    parts: list[int]
    shape: BatchShape
    rows: Rows
    eval_rows: Rows | None
    schedule: Schedule
    template: PromptTemplate
    tokenizer: Any
    ds_config: dict[str, Any]
    resume_from: checkpoint.Found | None

    @cached_property
    def run_meta(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed by it."""
        fingerprint = hashlib.sha256(np.asarray(self.rows.n_trained).tobytes()).hexdigest()[:16]
        args = self.spec.args
        model = f"{self.spec.model_type}, {self.spec.num_blocks} blocks, hidden {args.hidden_size}, vocab {args.vocab_size}"
        return {"model": model, "pipe": self.cfg.topology.pipe, "data": self.cfg.topology.data, "parts": self.parts,
                "train_batch_size": self.shape.global_rows, "micro_batch": self.shape.micro,
                "seed": self.cfg.seed, "rows": len(self.rows), "data_fingerprint": fingerprint}


def ensure_process_env() -> None:
    """`python train_ds.py` without the deepspeed launcher: a world of one process."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def plan(cfg: TrainConfig, *, world_size: int, local_rank: int) -> Plan:
    topo = cfg.topology
    if topo.pipe * topo.data != world_size:
        raise ConfigError(
            f"model_topo.process_topology dims pipe={topo.pipe} x data={topo.data} = {topo.pipe * topo.data} but "
            f"{world_size} processes were launched; launch {topo.pipe * topo.data} (deepspeed --num_gpus N) or change dims")
    check_deepspeed_keys(cfg.ds, cuda=torch.cuda.is_available())
    spec, model_dir = _model(cfg)
    costs = layer_costs(spec, seq_len=cfg.max_seq_len, grad_ckpt=cfg.use_grad_ckpt)
    parts = resolve_parts(topo.parts, costs=costs, num_stages=topo.pipe)
    shape = batch_shape(cfg.ds, topo.data)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # No template in the config: the one the model was trained with, if it carries one.
    own = model_dir / TEMPLATE_FILE
    template = load_template(cfg.template if cfg.template is not None else (own if own.is_file() else None))
    cache = cfg.data_cache_dir or cfg.save_path / "data_cache"
    rows = load_rows(_settings(cfg, cfg.data_path, template), tokenizer, cache_dir=cache, builder=local_rank == 0)
    eval_rows = None
    if cfg.eval_data_path is not None:
        eval_rows = load_rows(_settings(cfg, cfg.eval_data_path, template), tokenizer, cache_dir=cache,
                              builder=local_rank == 0)
    schedule = Schedule(n_rows=len(rows), shape=shape, seed=cfg.seed, n_epochs=cfg.n_epochs, max_steps=cfg.max_steps)
    ds_config = deepspeed_config(cfg, shape, schedule.total_steps, cuda=torch.cuda.is_available())
    found = checkpoint.newest_complete(cfg.save_path)
    p = Plan(cfg=cfg, spec=spec, model_dir=model_dir, parts=parts, shape=shape, rows=rows, eval_rows=eval_rows,
             schedule=schedule, template=template, tokenizer=tokenizer, ds_config=ds_config, resume_from=found)
    if found is not None:
        checkpoint.check_compatible(found, p.run_meta, cfg.save_path)
    return p


def _model(cfg: TrainConfig) -> tuple[ModelSpec, Path]:
    path = cfg.model_path
    if cfg.from_scratch:
        return load_spec(path), path
    try:
        directory, _, spec = open_pipeline_dir(path)
    except PipelineDirError as err:
        if (path / "config.json").is_file():
            raise ConfigError(
                f"model_path {path} is a Hugging Face checkpoint, not a pipeline dir: convert it first with "
                f"`python convert_model.py hg_to_pp --input-path {path} --save-path PP_DIR` (or set "
                f"from_scratch: true to train from a random init)") from err
        raise
    return spec, directory


def _settings(cfg: TrainConfig, paths: Any, template: PromptTemplate) -> DataSettings:
    return DataSettings(paths=paths, max_seq_len=cfg.max_seq_len, template=template,
                        train_on_prompt=cfg.train_on_prompt, pack=cfg.pack, lenient=cfg.skip_bad_samples,
                        seed=cfg.seed)


# ---------------------------------------------------------------------------------------------


class TrackedLoss:
    """The pipeline loss, remembering each micro-batch's loss and rows so a non-finite loss can
    be traced to its samples."""

    def __init__(self) -> None:
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = pipeline_loss(outputs, labels)
        self.records.append((loss.detach(), labels[1]))
        return loss

    def take_nonfinite_rows(self) -> list[int]:
        bad = [int(r) for loss, rows in self.records if not torch.isfinite(loss) for r in rows.tolist()]
        self.records.clear()
        return bad


def build_engine(p: Plan) -> tuple[Any, StagedPipeline, TrackedLoss]:
    cfg = p.cfg
    topology = ProcessTopology(axes=list(cfg.topology.axes), dims=[getattr(cfg.topology, a) for a in cfg.topology.axes])
    if p.resume_from is not None:
        source = WeightSource(Init.EMPTY)  # the checkpoint is loaded right after
    elif cfg.from_scratch:
        source = WeightSource(Init.RANDOM, seed=cfg.seed)
    else:
        source = WeightSource(Init.FROM_DIR, directory=p.model_dir)
    loss_fn = TrackedLoss()
    options = BuildOptions(grad_ckpt=cfg.use_grad_ckpt, packed=cfg.pack)
    pipe = StagedPipeline(p.spec, slots(p.spec, options), parts=p.parts, topology=topology, source=source,
                          dtype=train_dtype(cfg.ds), loss_fn=loss_fn)
    groups = param_groups(pipe, cfg.no_decay)
    engine, *_ = deepspeed.initialize(model=pipe, config=p.ds_config, model_parameters=groups,
                                      optimizer=build_client_optimizer(cfg.ds, groups))
    if clips_without_norm(cfg.ds):
        engine.norm_keeper = NormKeepingClip(user_clip(cfg.ds))
        engine.norm_keeper.attach(engine)
    if p.resume_from is not None:
        checkpoint.resume(engine, cfg.save_path, p.resume_from)
    return engine, pipe, loss_fn


# ---------------------------------------------------------------------------------------------


def train(p: Plan, engine: Any, pipe: StagedPipeline, loss_fn: TrackedLoss) -> dict[str, Any]:
    cfg, schedule = p.cfg, p.schedule
    total = schedule.total_steps
    dp_rank = data_parallel_rank(pipe)
    step = engine.global_steps
    progress = Progress(cfg.save_path, total=total, start=step, monitor=engine.monitor)
    last: dict[str, Any] = {}
    while step < total:
        rows_idx = schedule.step_rows(step)
        torch.manual_seed(cfg.seed * 1_000_003 + step * 4099 + dist.get_rank())  # dropout: a function of the step
        lr = _lr(engine)  # the rate this step uses (the scheduler moves on after the step)
        started = time.perf_counter()
        loss = float(engine.train_batch(micro_batches(p.rows, rows_idx, p.shape, dp_rank)))
        seconds = time.perf_counter() - started
        step = engine.global_steps
        _check_finite(loss, step, engine, loss_fn, p, rows_idx)
        real, trained, samples = step_token_counts(p.rows, rows_idx)
        last = {"step": step, "loss": loss, "lr": lr, "grad_norm": _grad_norm(engine),
                "tokens_per_s": real / seconds, "trained_tokens_per_s": trained / seconds,
                "samples_per_s": samples / seconds, "step_s": seconds}
        progress.step(last)
        if step < total:
            _periodic(p, engine, pipe, loss_fn, progress, step)
    return _finish(p, engine, pipe, loss_fn, progress, last)


def _periodic(p: Plan, engine: Any, pipe: StagedPipeline, loss_fn: TrackedLoss, progress: Progress, step: int) -> None:
    cfg = p.cfg
    if cfg.eval_every and p.eval_rows is not None and step % cfg.eval_every == 0:
        progress.eval(step, evaluate(p, engine, pipe, loss_fn))
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        progress.note(f"checkpoint at step {step}")
        checkpoint.save(engine, cfg.save_path, step, p.run_meta, cfg.keep_checkpoints)
    if cfg.export_every and step % cfg.export_every == 0:
        checkpoint.export_weights(pipe, model_path=p.model_dir, save_path=cfg.save_path, step=step, template=p.template)


def _finish(p: Plan, engine: Any, pipe: StagedPipeline, loss_fn: TrackedLoss, progress: Progress,
            last: dict[str, Any]) -> dict[str, Any]:
    cfg, step = p.cfg, engine.global_steps
    eval_loss = None
    if p.eval_rows is not None:
        eval_loss = evaluate(p, engine, pipe, loss_fn)
        progress.eval(step, eval_loss)
    found = checkpoint.newest_complete(cfg.save_path)
    if found is None or found.step != step:
        checkpoint.save(engine, cfg.save_path, step, p.run_meta, cfg.keep_checkpoints)
    weights = checkpoint.export_weights(pipe, model_path=p.model_dir, save_path=cfg.save_path, step=step,
                                        template=p.template, final=True)
    summary = {"steps": step, "last": last, "eval_loss": eval_loss, "weights": str(weights)}
    progress.finish(summary, export_hint=f"python convert_model.py pp_to_hg --input-path {cfg.save_path} "
                                         f"--save-path {cfg.save_path / 'hf'}")
    return summary


def evaluate(p: Plan, engine: Any, pipe: StagedPipeline, loss_fn: TrackedLoss) -> float:
    """Mean loss over every trained token of the eval set."""
    dp_rank = data_parallel_rank(pipe)
    pad = p.tokenizer.pad_token_id if p.tokenizer.pad_token_id is not None else p.tokenizer.eos_token_id
    total = 0.0
    for batch in eval_batches(p.eval_rows, p.shape, dp_rank, pad):
        total += float(engine.eval_batch(batch))
    loss_fn.records.clear()
    return total


def _check_finite(loss: float, step: int, engine: Any, loss_fn: TrackedLoss, p: Plan, rows_idx: np.ndarray) -> None:
    bad_rows = loss_fn.take_nonfinite_rows()
    if np.isfinite(loss):
        return
    if engine.fp16_enabled() and not engine.was_step_applied():
        log.warning("step %d: fp16 overflow, step skipped by DeepSpeed (loss scale lowered)", step)
        return
    samples = [s for r in (bad_rows or rows_idx.tolist()) for s in p.rows.row_samples(int(r))]
    where = "the samples of the micro-batch(es)" if bad_rows else "the samples of this step"
    newest = checkpoint.newest_complete(p.cfg.save_path)
    err = TrainingError(
        f"loss is {loss} at step {step}; {where}: {samples[:20]}{' ...' if len(samples) > 20 else ''}. "
        f"Nothing was saved after it; the newest checkpoint is "
        f"{'step ' + str(newest.step) if newest else 'none'}. Lower the learning rate, enable gradient_clipping, "
        f"or check those samples, then rerun the same command to resume.")
    err.located = bool(bad_rows)  # this rank saw the failing micro-batches: it reports too
    raise err


def _lr(engine: Any) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def _grad_norm(engine: Any) -> float | None:
    keeper = getattr(engine, "norm_keeper", None)
    norm = keeper.norm if keeper is not None else engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def run(cfg: TrainConfig) -> dict[str, Any]:
    """The whole job, on every rank."""
    ensure_process_env()
    deepspeed.init_distributed()
    try:
        p = plan(cfg, world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        engine, pipe, loss_fn = build_engine(p)
        return train(p, engine, pipe, loss_fn)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        release_shm_buffer()


USER_ERRORS = (ConfigError, DataError, PipelineDirError, TrainingError, ModelConfigError, PartitionError,
               WeightNameError)
