"""Benchmark worker, run on every rank by the DeepSpeed launcher (bench/_common.launch does it):

    deepspeed --num_gpus N bench/workers/arms.py --job JOB.json --out RESULT.json

The job names a model preset, a sequence length and a list of runners. A runner is one way of
training a step of `global_rows` rows:
  {"name": "pipe", "kind": "pipe", "pipe": P, "data": D, "micro": m}   our StagedPipeline, 1F1B
  {"name": "zero3", "kind": "zero", "stage": 3, "micro": m}            transformers' LlamaForCausalLM
                                                                          under DeepSpeed ZeRO
All runners are built first, then their steps are interleaved (runner order rotated every step),
each step between two barriers, so that load from other processes on the machine hits every
runner alike and ratios stay meaningful. Warm-up steps are not timed. Pipe runners may share an
engine with different micro-batch counts ("share": name of the runner whose engine to reuse).

With "init": "same" every runner starts from the same transformers-initialised weights, so the
first step's losses must agree across runners (a check that the arms train the same model on the
same data). With "memory": true there must be one runner; peak RSS above the pre-build RSS is
reported per rank.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import psutil
import torch
import torch.distributed as dist
from deepspeed.utils import groups

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench._common import llama_config, random_rows  # noqa: E402
from models.names import NameMap  # noqa: E402
from models.partition import resolve_parts  # noqa: E402
from models.pipeline import Init, StagedPipeline, WeightSource  # noqa: E402
from models.spec import BuildOptions, layer_costs, slots, spec_from_config  # noqa: E402
from training.config import BatchShape  # noqa: E402
from training.loader import micro_batches  # noqa: E402
from training.optim import param_groups  # noqa: E402

NO_DECAY = ["bias", "norm"]


def ds_config(*, micro: int, accum: int, data: int, stage: int, hidden: int) -> dict[str, Any]:
    """The same optimizer and clipping for every arm: torch's AdamW (as the trainer picks on
    machines without CUDA), fp32. ZeRO-3 keeps tensors below `hidden` elements (the norms)
    whole, as its default 1e5 threshold does for a 7B model; every matrix is partitioned."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * data, "steps_per_print": 2**31 - 1, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = hidden
    return cfg


class Timed:
    """Accumulates seconds per pipeline instruction (ForwardPass, RecvActivation, ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def wrap(self, engine: Any) -> None:
        def timed(name: str, fn: Any) -> Any:
            def run(eng: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(eng, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - t0
                    self.counts[name] += 1
            return run

        engine._INSTRUCTION_MAP = {k: timed(k.__name__, v) for k, v in type(engine)._INSTRUCTION_MAP.items()}

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()


# ---------------------------------------------------------------------------------------------
# runners


class PipeRunner:
    def __init__(self, spec: dict[str, Any], job: dict[str, Any], rows: Any, hf_state: dict | None,
                 shared: PipeRunner | None) -> None:
        self.name, self.micro, self.data = spec["name"], spec["micro"], spec.get("data", 1)
        self.accum = spec.get("global_rows", job["global_rows"]) // (self.micro * self.data)
        self.rows, self.seq = rows, job["seq_len"]
        self.global_rows = self.micro * self.accum * self.data
        if shared is not None:
            self.engine, self.pipe, self.timed = shared.engine, shared.pipe, Timed()
        else:
            self._build(spec, job, hf_state)
        self.dp_rank = self.pipe._grid.get_data_parallel_rank()
        self.stage = self.pipe._grid.get_stage_id()

    def _build(self, spec: dict[str, Any], job: dict[str, Any], hf_state: dict | None) -> None:
        from deepspeed.runtime.pipe.topology import ProcessTopology

        mspec = spec_from_config(llama_config(job["model"]))
        options = BuildOptions(grad_ckpt=spec.get("grad_ckpt", False))
        costs = layer_costs(mspec, seq_len=self.seq, grad_ckpt=options.grad_ckpt)
        parts = spec.get("parts") or resolve_parts("auto", costs=costs, num_stages=spec["pipe"])
        topo = ProcessTopology(axes=["pipe", "data"], dims=[spec["pipe"], self.data])
        source = (WeightSource(Init.EMPTY) if hf_state is not None
                  else WeightSource(Init.RANDOM, seed=job["seed"]))
        self.pipe = StagedPipeline(mspec, slots(mspec, options), parts=parts, topology=topo, source=source,
                                   dtype=torch.float32)
        if hf_state is not None:
            fill_from_hf_state(self.pipe.local_pairs(), mspec, hf_state)
        cfg = ds_config(micro=self.micro, accum=self.accum, data=self.data, stage=0,
                        hidden=mspec.args.hidden_size)
        self.engine, *_ = deepspeed.initialize(model=self.pipe, config=cfg,
                                               model_parameters=param_groups(self.pipe, NO_DECAY))
        self.parts = parts
        self.timed = Timed()

    def step(self, index: int) -> float:
        self.timed.wrap(self.engine)
        if self.engine.micro_batches != self.accum:
            self.engine.set_train_batch_size(self.global_rows)
        step_rows = step_slice(len(self.rows), self.global_rows, index)
        shape = BatchShape(self.micro, self.accum, self.data)
        return float(self.engine.train_batch(micro_batches(self.rows, step_rows, shape, self.dp_rank)))

    def local_params(self) -> int:
        return sum(p.numel() for p in self.pipe.parameters())


class ZeroRunner:
    def __init__(self, spec: dict[str, Any], job: dict[str, Any], rows: Any, hf_state: dict | None) -> None:
        from transformers import LlamaForCausalLM

        self.name, self.micro, self.stage = spec["name"], spec["micro"], spec["stage"]
        self.data = dist.get_world_size()
        self.accum = spec.get("global_rows", job["global_rows"]) // (self.micro * self.data)
        self.rows, self.global_rows = rows, self.micro * self.accum * self.data
        config = llama_config(job["model"])
        cfg = ds_config(micro=self.micro, accum=self.accum, data=self.data, stage=self.stage,
                        hidden=config.hidden_size)
        if hf_state is not None:
            model = LlamaForCausalLM(config)
            model.load_state_dict(hf_state)
        elif self.stage == 3:  # each rank materialises only its partition
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                model = LlamaForCausalLM(config)
        else:
            torch.manual_seed(job["seed"])
            model = LlamaForCausalLM(config)
        if spec.get("grad_ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model
        self.engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                               model_parameters=param_groups(model, NO_DECAY))
        self.dp_rank = dist.get_rank()
        self.phase: dict[str, float] = defaultdict(float)

    def step(self, index: int) -> float:
        step_rows = step_slice(len(self.rows), self.global_rows, index)
        shape = BatchShape(self.micro, self.accum, self.data)
        losses = []
        for (ids, _, _, targets), _ in micro_batches(self.rows, step_rows, shape, self.dp_rank):
            labels = torch.full_like(targets, -100)
            labels[:, 1:] = targets[:, :-1]  # HF shifts labels itself; ours are already shifted
            t0 = time.perf_counter()
            loss = self.engine(input_ids=ids, labels=labels).loss
            t1 = time.perf_counter()
            self.engine.backward(loss)
            t2 = time.perf_counter()
            self.engine.step()
            t3 = time.perf_counter()
            self.phase["forward"] += t1 - t0
            self.phase["backward"] += t2 - t1
            self.phase["step"] += t3 - t2
            losses.append(loss.detach())
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean)
        return float(mean) / self.data

    def local_params(self) -> int:
        # ZeRO-3 keeps this rank's share of each parameter in ds_tensor
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.model.parameters())


class SingleRunner:
    """The whole model as one stage in this process, without DeepSpeed: our layers (LayerStack),
    torch's AdamW with the same groups, clipping and loss. Each rank trains its own copy on the
    same rows: the per-core unit of work that the pipeline's bubble model is measured against."""

    def __init__(self, spec: dict[str, Any], job: dict[str, Any], rows: Any, hf_state: dict | None,
                 shared: SingleRunner | None) -> None:
        from models.stack import LayerStack, fill_random

        self.name, self.micro, self.data = spec["name"], spec["micro"], 1
        self.accum = spec.get("global_rows", job["global_rows"]) // self.micro
        self.rows, self.global_rows = rows, self.micro * self.accum
        if shared is not None:
            self.model, self.optimizer = shared.model, shared.optimizer
        else:
            mspec = spec_from_config(llama_config(job["model"]))
            self.model = LayerStack(mspec, BuildOptions(grad_ckpt=spec.get("grad_ckpt", False)))
            pairs = [(s, m) for s, m in self.model.pairs() if s.kind != "tied_head"]
            if hf_state is not None:
                fill_from_hf_state(pairs, mspec, hf_state)
            else:
                fill_random(pairs, seed=job["seed"], std=mspec.args.initializer_range)
            self.optimizer = torch.optim.AdamW(param_groups(self.model, NO_DECAY), lr=1e-4, betas=(0.9, 0.95),
                                               eps=1e-8, weight_decay=0.01)
        self.phase: dict[str, float] = defaultdict(float)

    def step(self, index: int) -> float:
        from models.common import pipeline_loss

        step_rows = step_slice(len(self.rows), self.global_rows, index)
        total = torch.zeros(())
        t0 = time.perf_counter()
        for inputs, labels in micro_batches(self.rows, step_rows, BatchShape(self.micro, self.accum, 1), 0):
            loss = pipeline_loss(self.model(*inputs), labels) / self.accum  # DeepSpeed's GAS scaling
            loss.backward()
            total += loss.detach()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.phase["forward+backward"] += t1 - t0
        self.phase["step"] += time.perf_counter() - t1
        return float(total)

    def local_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def step_slice(n_rows: int, global_rows: int, index: int) -> np.ndarray:
    """Rows of step `index`: consecutive blocks, wrapping around the generated rows."""
    start = (index * global_rows) % n_rows
    return np.arange(start, start + global_rows) % n_rows


def fill_from_hf_state(pairs: list[tuple[Any, torch.nn.Module]], mspec: Any,
                       hf_state: dict[str, torch.Tensor]) -> None:
    """Load (slot, module) pairs from a transformers state dict (names mapped by the family's
    table, as hg_to_pp does), so the pipeline starts from the same weights as the ZeRO arms."""
    names = NameMap(mspec)
    by_layer: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for hf_name, tensor in hf_state.items():
        target = names.to_pipeline(hf_name)
        if target is not None:
            by_layer[target[0]][target[1]] = tensor
    with torch.no_grad():
        for slot, module in pairs:
            layer = by_layer[0 if slot.kind == "tied_head" else slot.layer]
            module.load_state_dict({k: layer[k] for k in module.state_dict()}, strict=True)


# ---------------------------------------------------------------------------------------------


def build_runners(job: dict[str, Any], rows: Any) -> list[Any]:
    hf_state = None
    if job.get("init", "same") == "same":
        from transformers import LlamaForCausalLM

        torch.manual_seed(job["seed"])
        reference = LlamaForCausalLM(llama_config(job["model"]))
        hf_state = {k: v.clone() for k, v in reference.state_dict().items()}
    runners: list[Any] = []
    for spec in job["runners"]:
        groups.mpu = None  # DeepSpeed keeps the last engine's grid here; each runner gets its own
        shared = next((r for r in runners if r.name == spec.get("share")), None)
        if spec["kind"] == "pipe":
            runners.append(PipeRunner(spec, job, rows, hf_state, shared))
        elif spec["kind"] == "single":
            runners.append(SingleRunner(spec, job, rows, hf_state, shared))
        else:
            runners.append(ZeroRunner(spec, job, rows, hf_state))
        runners[-1].mpu = groups.mpu
    return runners


def p2p_probe(shape: tuple[int, ...], repeats: int = 20) -> float | None:
    """Seconds for one activation hand-off between two stages (fp32 hidden + three int64 [B,T]
    tensors, as DeepSpeed sends them) measured by ping-pong between ranks 0 and 1."""
    if dist.get_world_size() < 2:
        return None
    hidden = torch.zeros(shape)
    ints = [torch.zeros(shape[:2], dtype=torch.int64) for _ in range(3)]
    rank = dist.get_rank()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == 0:
            for t in (hidden, *ints):
                dist.send(t, 1)
            dist.recv(hidden, 1)
        elif rank == 1:
            for t in (hidden, *ints):
                dist.recv(t, 0)
            dist.send(hidden, 0)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / 2


def run(job: dict[str, Any]) -> dict[str, Any]:
    rank = dist.get_rank()
    most = max(r.get("global_rows", job["global_rows"]) for r in job["runners"])
    max_rows = most * (job["warmup"] + job["steps"])
    rows = random_rows(max_rows, job["seq_len"], llama_config(job["model"]).vocab_size, seed=job["seed"])
    rss_before = psutil.Process().memory_info().rss
    t_build = time.perf_counter()
    runners = build_runners(job, rows)
    build_s = time.perf_counter() - t_build
    losses: dict[str, list[float]] = defaultdict(list)
    times: dict[str, list[float]] = defaultdict(list)
    own: dict[str, list[float]] = defaultdict(list)
    profiler = cProfile.Profile() if job.get("cprofile") else None
    for i in range(job["warmup"] + job["steps"]):
        timed = i >= job["warmup"]
        if i == job["warmup"]:
            for r in runners:
                r.timed.reset() if isinstance(r, PipeRunner) else r.phase.clear()
        k = i % len(runners)
        for r in runners[k:] + runners[:k]:
            groups.mpu = r.mpu
            dist.barrier()
            if profiler is not None and timed:
                profiler.enable()
            t0 = time.perf_counter()
            losses[r.name].append(r.step(i))
            t1 = time.perf_counter()
            if profiler is not None and timed:
                profiler.disable()
            dist.barrier()
            t2 = time.perf_counter()
            if timed:
                times[r.name].append(t2 - t0)
                own[r.name].append(t1 - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    local = {"rank": rank, "own_step_s": dict(own), "peak_rss": peak_rss,
             "rss_before_build": rss_before, "build_s": build_s,
             "runners": {r.name: runner_info(r) for r in runners}}
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(job.get("cprofile_top", 30))
        local["cprofile"] = text.getvalue()
    probe = None
    if any(isinstance(r, PipeRunner) and r.pipe.num_stages > 1 for r in runners):
        r = next(r for r in runners if isinstance(r, PipeRunner))
        probe = p2p_probe((r.micro, job["seq_len"], llama_config(job["model"]).hidden_size))
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return {"job": job, "step_s": dict(times), "losses": dict(losses), "ranks": gathered, "p2p_s": probe,
            "world": dist.get_world_size(), "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                         "transformers": __import__("transformers").__version__}}


def runner_info(r: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"local_params": r.local_params(), "micro": r.micro, "accum": r.accum}
    if isinstance(r, PipeRunner):
        info.update(stage=r.stage, parts=getattr(r, "parts", None), instr_s=dict(r.timed.seconds),
                    instr_n=dict(r.timed.counts))
    else:
        info.update(phase_s=dict(r.phase))
    return info


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the launcher may pass it
    args = parser.parse_args()
    job = json.loads(args.job.read_text())
    torch.set_num_threads(job["threads"])
    deepspeed.init_distributed(dist_backend="gloo")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    result = run(job)
    if dist.get_rank() == 0:
        args.out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
